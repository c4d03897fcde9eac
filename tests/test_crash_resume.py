"""Crash and resume under torchrun: nothing is lost when a rank dies.

One run of the quick start (2 processes, sp_size 2, LoRA, ZeRO-2, a checkpoint every 3 steps) is hit by two
faults injected through test-only hooks (seqpar/train/faults.py), under ``torchrun --max-restarts=2`` and
``checkpoint.resume=auto``:

1. attempt 0: rank 1 is SIGKILLed in the middle of step 5 (after the step-3 checkpoint);
2. attempt 1 resumes from step 3; rank 1 is SIGKILLed while writing the step-6 checkpoint (its DeepSpeed
   shards are on disk, the rest is not): only a ``.tmp-`` folder remains, never mistaken for a checkpoint;
3. attempt 2 resumes from step 3 again and finishes.

Its per-step losses, logged once per step, and its final weights equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqpar.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "recipes" / "quickstart-cpu.yaml"
STEPS = 8
OVERRIDES = [f"trainer.max_steps={STEPS}", "trainer.warmup_steps=2", "data.passkey.num_samples=16",
             "checkpoint.every=3", "checkpoint.resume=auto", "logging.wandb=false"]


def torchrun(out: Path, *, restarts: int = 0, **faults: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **faults}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), "-m", "seqpar", "train", str(QUICK), f"trainer.output_dir={out}",
           *OVERRIDES]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=out.parent)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "checkpoints" / f"step-{STEPS:08d}" / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash")
    clean = torchrun(tmp / "clean")
    faulty = torchrun(tmp / "faulty", restarts=2, SEQPAR_FAULT_RANK="1", SEQPAR_FAULT_KILL_AT_STEP="5",
                      SEQPAR_FAULT_KILL_IN_SAVE="6@1")
    return {"tmp": tmp, "clean": clean, "faulty": faulty}


def test_both_faults_fired_and_each_restart_resumed_from_the_newest_complete_checkpoint(runs):
    log = runs["faulty"].stdout + runs["faulty"].stderr
    assert log.count("seqpar fault: SIGKILL rank 1 during step 5 (attempt 0)") == 1, log[-4000:]
    assert log.count("seqpar fault: SIGKILL rank 1 while saving step 6 (attempt 1)") == 1, log[-4000:]
    # Both restarts resumed from step 3: the half-written step 6 was never taken for a checkpoint.
    assert log.count("resumed from") == 2 and log.count(f"{os.sep}step-00000003 at step 3") == 2, log[-4000:]
    root = runs["tmp"] / "faulty" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000006", f"step-{STEPS:08d}"]  # no .tmp- left


def test_losses_equal_the_uninterrupted_run(runs):
    clean, faulty = metrics(runs["tmp"] / "clean"), metrics(runs["tmp"] / "faulty")
    assert [r["step"] for r in faulty] == list(range(1, STEPS + 1))  # each step logged once
    worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(clean, faulty))
    print(f"crash+resume vs uninterrupted: max |loss difference| over {STEPS} steps = {worst:.2e}")
    assert worst <= 1e-6, ([r["loss"] for r in clean], [r["loss"] for r in faulty])


def test_final_weights_equal_the_uninterrupted_run(runs):
    clean, faulty = adapter(runs["tmp"] / "clean"), adapter(runs["tmp"] / "faulty")
    assert clean.keys() == faulty.keys() and len(clean) > 0
    worst = max((clean[k] - faulty[k]).abs().max().item() for k in clean)
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
