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

import functools
import os
import signal
import time
from dataclasses import dataclass

from seqpar.train.recipe import RecipeError


class FaultSpecError(RecipeError):
    """A SEQPAR_FAULT_* variable that is not STEP[@ATTEMPT]."""


def _parse(name: str, environ) -> int | None:
    """The step at which fault ``name`` fires in this attempt, or None (unset, or armed for another attempt)."""
    spec = environ.get(f"SEQPAR_FAULT_{name}")
    if not spec:
        return None
    at, _, attempt = spec.partition("@")
    try:
        step, attempt = int(at), int(attempt or 0)
    except ValueError:
        raise FaultSpecError(f"SEQPAR_FAULT_{name}={spec!r}: use STEP or STEP@ATTEMPT, e.g. 5@1") from None
    return step if attempt == int(environ.get("TORCHELASTIC_RESTART_COUNT", 0)) else None


@dataclass(frozen=True)
class FaultHooks:
    """The faults of this process, read from the environment once (the training loop reads no variables)."""

    kill_at_step: int | None = None
    kill_in_save: int | None = None
    nan_at_step: int | None = None
    rank: int | None = None  # the rank to kill or signal; None: the last one
    attempt: int = 0
    signal_at_step: int | None = None
    signal_in_save: int | None = None
    signal: str = "SIGUSR1"
    hold_at_steps: tuple[int, ...] = ()

    @classmethod
    def from_env(cls, environ=None) -> FaultHooks:
        env = os.environ if environ is None else environ
        rank = env.get("SEQPAR_FAULT_RANK")
        holds = env.get("SEQPAR_FAULT_HOLD_AT_STEP", "")
        try:
            hold = tuple(int(h) for h in holds.split(",") if h.strip())
        except ValueError:
            raise FaultSpecError(f"SEQPAR_FAULT_HOLD_AT_STEP={holds!r}: use STEP[,STEP...], e.g. 2,5") from None
        sig = env.get("SEQPAR_FAULT_SIGNAL", "SIGUSR1")
        if sig not in signal.Signals.__members__:
            raise FaultSpecError(f"SEQPAR_FAULT_SIGNAL={sig!r}: use a signal name, e.g. SIGUSR1 or SIGTERM")
        return cls(_parse("KILL_AT_STEP", env), _parse("KILL_IN_SAVE", env), _parse("NAN_AT_STEP", env),
                   int(rank) if rank else None, int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
                   _parse("SIGNAL_AT_STEP", env), _parse("SIGNAL_IN_SAVE", env), sig, hold)

    def _targets(self, rank: int, world_size: int) -> bool:
        return rank == (world_size - 1 if self.rank is None else self.rank)

    def maybe_kill(self, point: str, step: int, rank: int, world_size: int) -> None:
        """At ``point`` ("step" or "save") of ``step``: the signal faults first, then SIGKILL when asked."""
        self._maybe_signal(point, step, rank, world_size)
        at, what = {"step": (self.kill_at_step, "during step"), "save": (self.kill_in_save, "while saving step")}[point]
        if at == step and self._targets(rank, world_size):
            print(f"seqpar fault: SIGKILL rank {rank} {what} {step} (attempt {self.attempt})", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: what a crashed node looks like

    def nan_loss(self, step: int) -> bool:
        return self.nan_at_step == step

    def _maybe_signal(self, point: str, step: int, rank: int, world_size: int) -> None:
        """A signal to this rank, or a hold until one arrives (tests/test_preemption.py, test_slurm_preempt.py)."""
        at, what = {"step": (self.signal_at_step, "during step"),
                    "save": (self.signal_in_save, "while saving step")}[point]
        if at == step and self._targets(rank, world_size):
            print(f"seqpar fault: {self.signal} to rank {rank} {what} {step}", flush=True)
            os.kill(os.getpid(), signal.Signals[self.signal])
        if point == "step" and step in self.hold_at_steps:
            from seqpar.train import preemption

            print(f"seqpar fault: rank {rank} holds in step {step} until a signal arrives", flush=True)
            deadline = time.monotonic() + 120
            while not preemption.received() and time.monotonic() < deadline:
                time.sleep(0.05)  # the handler runs between sleeps


@functools.cache
def hooks() -> FaultHooks:
    """This process's hooks, parsed on first use (a restarted torchrun worker is a new process)."""
    return FaultHooks.from_env()


def maybe_kill(point: str, step: int, rank: int, world_size: int) -> None:
    hooks().maybe_kill(point, step, rank, world_size)


def nan_loss(step: int) -> bool:
    return hooks().nan_loss(step)
