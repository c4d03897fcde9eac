"""Test-only fault injection for the reliability tests (tests/test_crash_resume.py, tests/test_bad_inputs.py).

Nothing happens unless a ``SEQPAR_FAULT_*`` variable is set:

    SEQPAR_FAULT_KILL_AT_STEP=STEP[@ATTEMPT]  SIGKILL rank SEQPAR_FAULT_RANK in the middle of optimizer step STEP
    SEQPAR_FAULT_KILL_IN_SAVE=STEP[@ATTEMPT]  SIGKILL it while the step-STEP checkpoint is being written
    SEQPAR_FAULT_NAN_AT_STEP=STEP[@ATTEMPT]   make the loss of step STEP NaN on every rank
    SEQPAR_FAULT_SIGNAL_AT_STEP=STEP[@ATTEMPT]  send SEQPAR_FAULT_SIGNAL (default SIGUSR1) to rank SEQPAR_FAULT_RANK
                                              in the middle of step STEP (tests/test_preemption.py)
    SEQPAR_FAULT_SIGNAL_IN_SAVE=STEP[@ATTEMPT]  the same while the step-STEP checkpoint is being written
    SEQPAR_FAULT_HOLD_AT_STEP=STEP[,STEP...]  every rank waits in the middle of each listed step (at most 120 s)
                                              until it has received a preemption signal: the SLURM test signals
                                              a job at a known step (tests/test_slurm_preempt.py)

ATTEMPT (default 0) is compared with torchrun's TORCHELASTIC_RESTART_COUNT, so a fault fires in one attempt
and the restarted group runs clean; SEQPAR_FAULT_RANK defaults to the last rank.
"""

from __future__ import annotations

import os
import signal
import time


def _attempt() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def armed(name: str, step: int) -> bool:
    spec = os.environ.get(f"SEQPAR_FAULT_{name}")
    if not spec:
        return False
    at, _, attempt = spec.partition("@")
    return int(at) == step and int(attempt or 0) == _attempt()


def maybe_kill(point: str, step: int, rank: int, world_size: int) -> None:
    """SIGKILL this rank at ``point`` ("step" or "save") of ``step`` when a fault asks for it."""
    _maybe_signal(point, step, rank, world_size)
    name, what = {"step": ("KILL_AT_STEP", "during step"), "save": ("KILL_IN_SAVE", "while saving step")}[point]
    if armed(name, step) and rank == int(os.environ.get("SEQPAR_FAULT_RANK", world_size - 1)):
        print(f"seqpar fault: SIGKILL rank {rank} {what} {step} (attempt {_attempt()})", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: what a crashed node looks like


def nan_loss(step: int) -> bool:
    return armed("NAN_AT_STEP", step)


def _maybe_signal(point: str, step: int, rank: int, world_size: int) -> None:
    """The signal faults (the kills' call sites): a signal to this rank, or a hold until one arrives."""
    name, what = {"step": ("SIGNAL_AT_STEP", "during step"), "save": ("SIGNAL_IN_SAVE", "while saving step")}[point]
    if armed(name, step) and rank == int(os.environ.get("SEQPAR_FAULT_RANK", world_size - 1)):
        sig = signal.Signals[os.environ.get("SEQPAR_FAULT_SIGNAL", "SIGUSR1")]
        print(f"seqpar fault: {sig.name} to rank {rank} {what} {step}", flush=True)
        os.kill(os.getpid(), sig)
    holds = os.environ.get("SEQPAR_FAULT_HOLD_AT_STEP", "")
    if point == "step" and str(step) in holds.split(","):
        from seqpar.train import preemption

        print(f"seqpar fault: rank {rank} holds in step {step} until a signal arrives", flush=True)
        deadline = time.monotonic() + 120
        while not preemption.received() and time.monotonic() < deadline:
            time.sleep(0.05)  # the handler runs between sleeps
