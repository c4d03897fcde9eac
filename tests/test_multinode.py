"""Multi-node without a cluster: two network-namespace hosts (tests/netns_hosts.py), each running torchrun
``--nnodes=2 --nproc_per_node=2`` with the c10d rendezvous on the first host, train the quick start with
sp_size 2 inside a host and data parallelism 2 across the hosts. Its losses equal the same training on one
host (4 processes, sp 2 x dp 2: the same global batch), read from the two runs' metrics JSONL files. The one-host
run is the session's SP x DP reference (tests/sp_dp_runs.py, shared with tests/test_fsdp2.py and
tests/test_train.py): the same overrides for 10 steps, whose first 3 are compared (the schedule is constant
after the warm-up, so they are this run's 3 steps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.netns_hosts import two_hosts  # noqa: F401  (fixture)
from tests.sp_dp_runs import REFERENCE

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "recipes" / "quickstart-cpu.yaml"
STEPS = 3
OVERRIDES = [o for o in REFERENCE if not o.startswith("trainer.max_steps=")] + [f"trainer.max_steps={STEPS}"]
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
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][:STEPS]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return [r["loss"] for r in records]


def test_two_hosts_sp_x_dp_equal_one_host(two_hosts, tmp_path, sp_dp_runs):  # noqa: F811
    sp_dp_runs.start("zero2")  # one host, 4 processes (tests/sp_dp_runs.py): in the background if not done yet
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

    sp_dp_runs.records("zero2")  # waits for it
    a, b = losses(tmp_path / "two-hosts"), losses(sp_dp_runs.folder("zero2"))
    worst = max(abs(x - y) for x, y in zip(a, b))
    print(f"2 hosts x 2 vs 1 host x 4 (sp 2 x dp 2): max |loss difference| over {STEPS} steps = {worst:.2e}")
    assert worst <= 1e-6, (a, b)
