"""Real SLURM: the project's own ``slurm/train.sbatch`` runs the CPU quick start through sbatch on a one-node
cluster (tests/slurm_cluster.py): srun starts one torchrun per node, torchrun two processes that meet at the
c10d rendezvous on the first node named by ``scontrol show hostnames $SLURM_JOB_NODELIST``. The job must end
COMPLETED with exit code 0:0, its log must hold the loss lines, and the final checkpoint must be complete.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "recipes" / "quickstart-cpu.yaml"
STEPS = 3


def test_sbatch_runs_the_quickstart_on_two_processes(slurm_cluster, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.out"
    env = {**slurm_cluster.env, "PYTHON": sys.executable, "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = ["sbatch", "--parsable", "--nodes=1", f"--cpus-per-task={os.cpu_count()}", "--time=10", "--gpus-per-node=0",
           f"--output={log}", f"--chdir={tmp_path}", str(ROOT / "slurm" / "train.sbatch"), str(QUICK),
           f"trainer.output_dir={out}", f"trainer.max_steps={STEPS}", "trainer.warmup_steps=1",
           "data.passkey.num_samples=8", "logging.wandb=false", "launch.device=cpu"]
    sub = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, f"sbatch refused the script: {sub.stderr}"
    job = int(sub.stdout.strip().split(";")[0])
    state = slurm_cluster.wait(job, timeout=400)
    text = log.read_text() if log.exists() else "(no log)"
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", f"{state}\n{text[-6000:]}"
    assert f"seqpar: 1 node(s) x 2 process(es), rendezvous {slurm_cluster.node}:" in text, text[-3000:]
    losses = [float(x) for x in re.findall(r"^step \d+(?:/\d+)? loss ([0-9.]+)", text, re.M)]
    assert len(losses) == STEPS and all(0 < x < 10 for x in losses), text[-3000:]
    final = out / "checkpoints" / f"step-{STEPS:08d}"
    assert (final / "COMPLETE").is_file() and (final / "adapter" / "adapter_model.safetensors").is_file()
    state_json = json.loads((final / "trainer_state.json").read_text())
    assert state_json["step"] == STEPS and state_json["world_size"] == 2
