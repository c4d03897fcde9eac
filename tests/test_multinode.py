"""Multi-node without a cluster: two network-namespace hosts (tests/netns_hosts.py), each running torchrun
``--nnodes=2 --nproc_per_node=2`` with the c10d rendezvous on the first host, train the quick start with
sp_size 2 inside a host and data parallelism 2 across the hosts. Its losses equal the same training on one
host (4 processes, sp 2 x dp 2: the same global batch), read from the two runs' metrics JSONL files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from seqpar.launcher import free_port
from tests.netns_hosts import two_hosts  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "recipes" / "quickstart-cpu.yaml"
STEPS = 3
OVERRIDES = [f"trainer.max_steps={STEPS}", "trainer.warmup_steps=1", "data.passkey.num_samples=8", "data.seq_len=256",
             "logging.wandb=false", "checkpoint.every=0"]
RDZV_PORT = 29455  # inside the first host's namespace: nothing else listens there


def _env(extra: dict | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(extra or {})}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(var, None)
    return env


def train_cmd(out: Path, launcher: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "seqpar", "train", str(QUICK),
            f"trainer.output_dir={out}", *OVERRIDES]


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return [r["loss"] for r in records]


def test_two_hosts_sp_x_dp_equal_one_host(two_hosts, tmp_path):  # noqa: F811
    first = two_hosts[0]
    procs = []
    for i, host in enumerate(two_hosts):
        launcher = ["--nnodes=2", "--nproc_per_node=2", "--rdzv-backend=c10d", "--rdzv-id=seqpar-test",
                    f"--rdzv-endpoint={first.addr}:{RDZV_PORT}", f"--local-addr={host.addr}",
                    f"--rdzv_conf=is_host={'true' if i == 0 else 'false'}"]
        procs.append(subprocess.Popen(host.command(train_cmd(tmp_path / "two-hosts", launcher)),
                                      env=host.env(_env()), cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-6000:]

    one = subprocess.run(train_cmd(tmp_path / "one-host", ["--nnodes=1", "--nproc_per_node=4",
                                                            "--master_port", str(free_port())]),
                         env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-6000:]
    a, b = losses(tmp_path / "two-hosts"), losses(tmp_path / "one-host")
    worst = max(abs(x - y) for x, y in zip(a, b))
    print(f"2 hosts x 2 vs 1 host x 4 (sp 2 x dp 2): max |loss difference| over {STEPS} steps = {worst:.2e}")
    assert worst <= 1e-6, (a, b)
