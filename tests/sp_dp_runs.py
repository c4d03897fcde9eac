"""The SP = 2 x DP = 2 references, trained once per session (``sp_dp_runs``, tests/conftest.py) for three modules:

- ``zero2``: the quick start (DeepSpeed ZeRO-2, S2-Attn, LoRA) on 4 processes, sp_size 2 x dp 2;
- ``one``: its one-process twin (sp_size 1) accumulating the same 2 sequences per step (grad_accum 2).

tests/test_fsdp2.py compares FSDP2 with both, tests/test_train.py compares the two with each other (2-D SP x DP
equals one process), tests/test_multinode.py compares two hosts x 2 processes with ``zero2``'s first steps (the
schedule is constant after the warm-up: a shorter run's steps are the longer one's first steps). Each run starts in
the background when a test first asks for it (tests/test_fsdp2.py asks for both and starts its own runs beside
them) and is waited for when its result is read.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

STEPS = 10
# 256 tokens (128 per SP rank) keep the steps cheap
COMMON = [f"trainer.max_steps={STEPS}", "trainer.warmup_steps=2", "data.passkey.num_samples=16", "data.seq_len=256",
          "logging.wandb=false"]
REFERENCE = [*COMMON, "checkpoint.every=0"]
RUNS = {"zero2": (4, REFERENCE), "one": (1, [*REFERENCE, "attention.sp_size=1", "trainer.grad_accum=2"])}


class SpDpRuns:
    """``start(name)`` launches a run in the background (once); ``records(name)`` waits for it and returns its
    metrics records; ``folder(name)`` is its output folder."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self._pool = ThreadPoolExecutor(len(RUNS))
        self._futures: dict[str, Future] = {}

    def start(self, *names: str) -> None:
        from tests.test_train import launch

        for name in names or RUNS:
            if name not in self._futures:
                nproc, overrides = RUNS[name]
                self._futures[name] = self._pool.submit(launch, nproc, self.folder(name), overrides)

    def records(self, name: str) -> list[dict]:
        self.start(name)
        return self._futures[name].result()

    def folder(self, name: str) -> Path:
        return self.tmp / name

    def close(self) -> None:
        self._pool.shutdown(wait=True)
