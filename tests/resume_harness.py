"""The quick start as the crash, preemption and SLURM requeue tests run it: 8 steps, a checkpoint every 3,
``checkpoint.resume=auto``, 2 processes (sp_size 2, LoRA, ZeRO-2), and readers for what a run leaves behind.

tests/conftest.py runs it once, uninterrupted, for the whole session (``quickstart_reference``): every test
that interrupts a run compares its losses and final weights with that one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "recipes" / "quickstart-cpu.yaml"
STEPS = 8
OVERRIDES = [f"trainer.max_steps={STEPS}", "trainer.warmup_steps=2", "data.passkey.num_samples=16",
             "checkpoint.every=3", "checkpoint.resume=auto", "logging.wandb=false"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any launcher's variables (a test may run under one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}
    for var in LAUNCH_VARS:
        env.pop(var, None)
    return env


def torchrun(out: Path, *, restarts: int = 0, **faults: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), "-m", "seqpar", "train", str(QUICK), f"trainer.output_dir={out}",
           *OVERRIDES]
    proc = subprocess.run(cmd, env=clean_env(**faults), capture_output=True, text=True, timeout=400, cwd=out.parent)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter(out: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "checkpoints" / f"step-{step:08d}" / "adapter" / "adapter_model.safetensors")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and len(a) > 0
    return max((a[k] - b[k]).abs().max().item() for k in a)


def wandb_history(out: Path) -> list[tuple[str, int, float]]:
    """(run id, step, loss) of every history row of the offline wandb runs under ``out``, oldest run first."""
    from seqpar.train.wandb_history import history

    rows = []
    for path in sorted((out / "wandb" / "wandb").glob("offline-run-*/run-*.wandb")):
        run_id = path.parent.name.rsplit("-", 1)[1]
        rows += [(run_id, step, row["loss"]) for step, row in history(path)]
    return rows
