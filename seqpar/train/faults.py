"""Test-only fault injection for the reliability tests (tests/test_crash_resume.py, tests/test_bad_inputs.py).

Nothing happens unless a ``SEQPAR_FAULT_*`` variable is set:

    SEQPAR_FAULT_KILL_AT_STEP=STEP[@ATTEMPT]  SIGKILL rank SEQPAR_FAULT_RANK in the middle of optimizer step STEP
    SEQPAR_FAULT_KILL_IN_SAVE=STEP[@ATTEMPT]  SIGKILL it while the step-STEP checkpoint is being written
    SEQPAR_FAULT_NAN_AT_STEP=STEP[@ATTEMPT]   make the loss of step STEP NaN on every rank

ATTEMPT (default 0) is compared with torchrun's TORCHELASTIC_RESTART_COUNT, so a fault fires in one attempt
and the restarted group runs clean; SEQPAR_FAULT_RANK defaults to the last rank.
"""

from __future__ import annotations

import functools
import os
import signal
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
    rank: int | None = None  # the rank to kill; None: the last one
    attempt: int = 0

    @classmethod
    def from_env(cls, environ=None) -> FaultHooks:
        env = os.environ if environ is None else environ
        rank = env.get("SEQPAR_FAULT_RANK")
        return cls(_parse("KILL_AT_STEP", env), _parse("KILL_IN_SAVE", env), _parse("NAN_AT_STEP", env),
                   int(rank) if rank else None, int(env.get("TORCHELASTIC_RESTART_COUNT", 0)))

    def maybe_kill(self, point: str, step: int, rank: int, world_size: int) -> None:
        """SIGKILL this rank at ``point`` ("step" or "save") of ``step`` when a fault asks for it."""
        at, what = {"step": (self.kill_at_step, "during step"), "save": (self.kill_in_save, "while saving step")}[point]
        if at == step and rank == (world_size - 1 if self.rank is None else self.rank):
            print(f"seqpar fault: SIGKILL rank {rank} {what} {step} (attempt {self.attempt})", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: what a crashed node looks like

    def nan_loss(self, step: int) -> bool:
        return self.nan_at_step == step


@functools.cache
def hooks() -> FaultHooks:
    """This process's hooks, parsed on first use (a restarted torchrun worker is a new process)."""
    return FaultHooks.from_env()


def maybe_kill(point: str, step: int, rank: int, world_size: int) -> None:
    hooks().maybe_kill(point, step, rank, world_size)


def nan_loss(step: int) -> bool:
    return hooks().nan_loss(step)
