"""Save on a signal, without SLURM: ``launch/torchrun.sh`` runs the quick start (tests/resume_harness.py) and
test-only hooks (seqpar/train/faults.py) send one rank a signal at chosen moments:

1. SIGUSR1 to rank 1 in the middle of step 1, before any checkpoint exists, and a second SIGUSR1 while the
   step-1 checkpoint that this first signal asked for is being written: the run stops after step 1 with a
   complete checkpoint and exit code 75 (rank 0 got no signal: the per-step agreement stops it too);
2. resumed, SIGUSR1 to rank 0 while the periodic step-3 checkpoint is written: that checkpoint completes and
   is the one the run stops with (no second save), exit code 75 again.

The two partial runs' losses equal the uninterrupted run's (tests/conftest.py) and every step is logged
once; the SLURM test (tests/test_slurm_preempt.py) resumes to the end and compares the final weights.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from seqpar.train.preemption import EXIT_PREEMPTED
from seqpar.train.recipe import RecipeError, load_recipe
from seqpar.train.validate import validate
from tests.resume_harness import OVERRIDES, QUICK, ROOT, adapter, clean_env, max_difference, metrics, wandb_history


def launch(out: Path, *extra: str, **faults: str) -> subprocess.CompletedProcess:
    cmd = ["bash", str(ROOT / "launch" / "torchrun.sh"), str(QUICK), f"trainer.output_dir={out}", *OVERRIDES,
           "logging.wandb=true", *extra]
    return subprocess.run(cmd, env=clean_env(NPROC="2", PYTHON=sys.executable, WANDB_MODE="offline", **faults),
                          capture_output=True, text=True, timeout=400, cwd=out.parent)


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("preempt") / "run"
    first = launch(out, SEQPAR_FAULT_RANK="1", SEQPAR_FAULT_SIGNAL_AT_STEP="1", SEQPAR_FAULT_SIGNAL_IN_SAVE="1")
    after_first = checkpoints(out)
    second = launch(out, SEQPAR_FAULT_RANK="0", SEQPAR_FAULT_SIGNAL_IN_SAVE="3")
    return {"out": out, "first": first, "second": second, "after_first": after_first}


def log(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def test_a_signal_before_the_first_checkpoint_saves_one_and_exits_75(runs):
    first, text = runs["first"], log(runs["first"])
    assert first.returncode == EXIT_PREEMPTED, text[-6000:]
    assert text.count("seqpar fault: SIGUSR1 to rank 1 during step 1") == 1, text[-4000:]
    assert text.count("seqpar fault: SIGUSR1 to rank 1 while saving step 1") == 1, text[-4000:]  # the second one
    assert "seqpar: preempted: stopped after step 1" in text and "rerun with --resume" in text, text[-4000:]
    assert runs["after_first"] == ["step-00000001"]  # checkpoint.every=3: only the signal wrote it


def test_a_signal_during_a_periodic_save_stops_with_that_checkpoint(runs):
    second, text = runs["second"], log(runs["second"])
    assert second.returncode == EXIT_PREEMPTED, text[-6000:]
    assert "step-00000001 at step 1" in text and "seqpar: preempted: stopped after step 3" in text, text[-4000:]
    assert text.count("seqpar fault: SIGUSR1 to rank 0 while saving step 3") == 1, text[-4000:]
    assert checkpoints(runs["out"]) == ["step-00000001", "step-00000003"]  # complete, no .tmp- left


def test_steps_are_logged_once_with_the_uninterrupted_losses(runs, quickstart_reference):
    got, want = metrics(runs["out"]), metrics(quickstart_reference)
    assert [r["step"] for r in got] == [1, 2, 3]
    worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(got, want))
    print(f"preempted twice vs uninterrupted: max |loss difference| over 3 steps = {worst:.2e}")
    assert worst <= 1e-6
    # The step-3 weights are those of the uninterrupted run after step 3 (its every-3 checkpoints are 6 and 8,
    # so compare with its final weights only to show that the comparison can fail).
    assert max_difference(adapter(runs["out"], 3), adapter(quickstart_reference)) > 1e-4


def test_one_wandb_run_across_the_restarts_with_each_step_once(runs):
    offline = sorted((runs["out"] / "wandb" / "wandb").glob("offline-run-*"))
    run_id = (runs["out"] / "wandb" / "run_id").read_text().strip()
    assert len(offline) == 2 and all(p.name.endswith("-" + run_id) for p in offline), offline
    rows = wandb_history(runs["out"])
    assert [(r, s) for r, s, _ in rows] == [(run_id, 1), (run_id, 2), (run_id, 3)]
    assert [loss for *_, loss in rows] == [r["loss"] for r in metrics(runs["out"])]


def test_an_unknown_signal_is_a_recipe_error():
    with pytest.raises(RecipeError) as err:
        validate(load_recipe(QUICK, ["checkpoint.on_signal=[SIGUSR1,SIGFOO]"]), 2)
    assert "checkpoint.on_signal[1]='SIGFOO'" in str(err.value) and "SIGTERM" in str(err.value)
    validate(load_recipe(QUICK, ["checkpoint.on_signal=[usr2,SIGINT]"]), 2)
    validate(load_recipe(QUICK, ["checkpoint.on_signal=[]"]), 2)
