"""Save on a signal: the warning SLURM sends before a time limit (``--signal=B:USR1@120``) or a preemption
becomes a checkpoint at the next optimizer-step boundary and an exit that means "preempted, resume me".

    preempt = Preemption(recipe)                 # handlers for checkpoint.on_signal: they only set a flag
    for step in ...:
        ...                                      # one optimizer step, the periodic checkpoint
        if preempt.requested(parallel) and step < max_steps:   # one all_reduce MAX of a 4-byte flag
            preempt.exit(step, ...)              # checkpoint (unless this step wrote one), marker, exit 75

- The handlers only record the signal, so a step or a checkpoint write is never interrupted: a second
  signal during the save changes nothing, and the save stays atomic (``.tmp-`` folder, manifest, ``COMPLETE``,
  rename; seqpar/train/checkpoint.py).
- Ranks do not get the signal at the same moment (SLURM signals node after node, torchrun forwards late, a
  ``kill`` hits one process), so the flag is reduced with MAX over the whole world once per optimizer step
  and every rank stops after the same step. That is one 4-byte collective per step (not per layer or
  micro-batch), beside the loss's ``.item()`` that already waits for the step.
- ``EXIT_PREEMPTED`` (75, sysexits' EX_TEMPFAIL, "temporary failure, try again") is seqpar train's exit code.
  torchrun reports any failed worker as 1, so every rank also writes the step into the file named by
  ``SEQPAR_PREEMPTED_FILE`` (launch/torchrun.sh and slurm/train.sbatch set it): those scripts exit 75 or
  requeue the job when it exists and the run did not succeed.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75
MARKER_ENV = "SEQPAR_PREEMPTED_FILE"
_UNCATCHABLE = {"SIGKILL", "SIGSTOP"}
_active: Preemption | None = None  # for the test-only hold in seqpar/train/faults.py


def signal_of(name: str) -> signal.Signals | None:
    """``"SIGUSR1"``, ``"usr1"`` -> signal.SIGUSR1; None for a name that is not a catchable signal."""
    upper = str(name).strip().upper()
    upper = upper if upper.startswith("SIG") else "SIG" + upper
    sig = signal.Signals.__members__.get(upper)
    return None if sig is None or upper in _UNCATCHABLE else sig


def check_signals(names: list[str], errors: list[str]) -> None:
    """Recipe check for ``checkpoint.on_signal`` (seqpar/train/validate.py)."""
    for i, name in enumerate(names):
        if signal_of(name) is None:
            errors.append(f"checkpoint.on_signal[{i}]={name!r}: not a signal seqpar can catch: use names such as "
                          "SIGTERM, SIGUSR1, SIGUSR2, SIGINT, SIGHUP (or [] to turn saving on a signal off)")


def received() -> bool:
    return _active is not None and _active.signal_name is not None


class Preemption:
    """Installs the handlers (main thread only; elsewhere saving on a signal is off) and remembers the first
    signal; ``close`` restores the previous handlers."""

    def __init__(self, recipe: Any):
        global _active
        self.signal_name: str | None = None
        self.received_at = 0.0
        self.marker = os.environ.get(MARKER_ENV)
        self._previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in filter(None, map(signal_of, recipe.checkpoint.on_signal)):
                self._previous[sig] = signal.signal(sig, self._handler)
        _active = self

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signal_name is None:  # later signals (torchrun's forwarded copy, a second scancel) change nothing
            self.signal_name, self.received_at = signal.Signals(signum).name, time.monotonic()

    def requested(self, parallel: Any) -> bool:
        """Collective, once per optimizer step: True on every rank when any rank got a signal."""
        flag = torch.tensor([int(self.signal_name is not None)], dtype=torch.int32, device=parallel.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def exit(self, step: int, parallel: Any, save: Callable[[], Path] | None, close: Callable[[], None]) -> None:
        """Checkpoint (``save``; None when this step already wrote one), write the marker on every rank, close
        the logs and the process group, raise SystemExit(EXIT_PREEMPTED)."""
        t0 = time.monotonic()
        if save is not None:
            save()
        if self.marker:  # every rank: the file exists on every node, node-local or shared
            Path(self.marker).write_text(f"{step}\n")
        if dist.is_initialized():
            dist.barrier()  # every marker is written before any rank exits (srun --kill-on-bad-exit)
        close()
        self.close()
        if parallel.is_main:
            since = f", {time.monotonic() - self.received_at:.1f}s after {self.signal_name}" if self.signal_name else ""
            print(f"seqpar: preempted: stopped after step {step}, checkpoint written in {time.monotonic() - t0:.1f}s"
                  f"{since}; exit code {EXIT_PREEMPTED}: resume with --resume (slurm/train.sbatch requeues)",
                  flush=True)
        parallel.destroy()
        raise SystemExit(EXIT_PREEMPTED)

    def close(self) -> None:
        global _active
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        _active = None
