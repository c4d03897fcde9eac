"""Crash and resume under torchrun: nothing is lost when a rank dies.

One run of the quick start (tests/resume_harness.py: 2 processes, sp_size 2, LoRA, ZeRO-2, a checkpoint every
3 steps) is hit by two faults injected through test-only hooks (seqpar/train/faults.py), under
``torchrun --max-restarts=2`` and ``checkpoint.resume=auto``:

1. attempt 0: rank 1 is SIGKILLed in the middle of step 5 (after the step-3 checkpoint);
2. attempt 1 resumes from step 3; rank 1 is SIGKILLed while writing the step-6 checkpoint (its DeepSpeed
   shards are on disk, the rest is not): only a ``.tmp-`` folder remains, never mistaken for a checkpoint;
3. attempt 2 resumes from step 3 again and finishes.

Its per-step losses, logged once per step, and its final weights equal the uninterrupted run's
(``quickstart_reference``, tests/conftest.py, shared with the preemption tests).
"""

from __future__ import annotations

import os

import pytest

from seqpar.train import checkpoint as ckpt
from tests.resume_harness import STEPS, adapter, max_difference, metrics, torchrun


@pytest.fixture(scope="module")
def runs(tmp_path_factory, quickstart_reference):
    tmp = tmp_path_factory.mktemp("crash")
    faulty = torchrun(tmp / "faulty", restarts=2, SEQPAR_FAULT_RANK="1", SEQPAR_FAULT_KILL_AT_STEP="5",
                      SEQPAR_FAULT_KILL_IN_SAVE="6@1")
    return {"tmp": tmp, "clean": quickstart_reference, "faulty": faulty}


def test_both_faults_fired_and_each_restart_resumed_from_the_newest_complete_checkpoint(runs):
    log = runs["faulty"].stdout + runs["faulty"].stderr
    assert log.count("seqpar fault: SIGKILL rank 1 during step 5 (attempt 0)") == 1, log[-4000:]
    assert log.count("seqpar fault: SIGKILL rank 1 while saving step 6 (attempt 1)") == 1, log[-4000:]
    # Both restarts resumed from step 3: the half-written step 6 was never taken for a checkpoint.
    assert log.count("resumed from") == 2 and log.count(f"{os.sep}step-00000003 at step 3") == 2, log[-4000:]
    root = runs["tmp"] / "faulty" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000006", f"step-{STEPS:08d}"]  # no .tmp- left


def test_losses_equal_the_uninterrupted_run(runs):
    clean, faulty = metrics(runs["clean"]), metrics(runs["tmp"] / "faulty")
    assert [r["step"] for r in faulty] == list(range(1, STEPS + 1))  # each step logged once
    worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(clean, faulty))
    print(f"crash+resume vs uninterrupted: max |loss difference| over {STEPS} steps = {worst:.2e}")
    assert worst <= 1e-6, ([r["loss"] for r in clean], [r["loss"] for r in faulty])


def test_final_weights_equal_the_uninterrupted_run(runs):
    worst = max_difference(adapter(runs["clean"]), adapter(runs["tmp"] / "faulty"))
    print(f"crash+resume vs uninterrupted: max |weight difference| = {worst:.2e}")
    assert worst <= 1e-6


def test_half_written_folders_are_never_taken_for_checkpoints(tmp_path):
    """What a kill can leave: a .tmp- folder (even with its marker written) or a step folder without one."""
    good = tmp_path / "step-00000002"
    good.mkdir()
    (good / ckpt.MARKER).write_text("ok\n")
    tmp = tmp_path / ".tmp-step-00000004"  # killed between the marker and the rename
    tmp.mkdir()
    (tmp / ckpt.MARKER).write_text("ok\n")
    (tmp_path / "step-00000003").mkdir()  # a folder without its marker
    assert ckpt.latest_checkpoint(tmp_path) == good
