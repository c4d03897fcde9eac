"""A real single-node SLURM cluster on loopback for the tests: munged, slurmctld and slurmd with every state,
spool, log and pid path under a temporary folder, stopped afterwards (exactly the daemons started here).

Installs Debian's ``slurm-wlm`` and ``munge`` when missing and the process may (root, apt-get present);
otherwise the fixture skips with the reason. Settings that work without cgroups: proctrack/linuxproc,
task/none, select/cons_tres, an empty PlugStackConfig (so the system's is not read), ``slurmctld -i`` on
a fresh state folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

CRED_EXPIRE_S = 10
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_slurm_installed() -> str | None:
    """None when SLURM and munge are usable, else the reason they are not."""
    if all(shutil.which(d) for d in DAEMONS):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "slurm-wlm/munge are not installed and cannot be installed here (needs root and apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if res.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {res.stderr.strip()[-300:]}"
    missing = [d for d in DAEMONS if not shutil.which(d)]
    return f"installed slurm-wlm/munge but {missing} are still missing" if missing else None


@dataclass
class SlurmCluster:
    root: Path
    node: str
    env: dict[str, str]

    def sbatch(self, script: str | Path, *args: str, cwd: str | Path | None = None) -> int:
        res = subprocess.run(["sbatch", "--parsable", *args, str(script)], capture_output=True, text=True,
                             env=self.env, cwd=cwd, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"sbatch failed: {res.stderr.strip()}")
        return int(res.stdout.strip().split(";")[0])

    def job_state(self, job_id: int) -> dict[str, str]:
        res = subprocess.run(["scontrol", "show", "job", str(job_id)], capture_output=True, text=True,
                             env=self.env, timeout=30)
        fields = {}
        for token in res.stdout.split():
            if "=" in token:
                key, _, value = token.partition("=")
                fields[key] = value
        return fields

    def wait(self, job_id: int, timeout: float) -> dict[str, str]:
        """Poll scontrol (sbatch --wait polls only every 10 s) until the job ends; return its fields."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return state
            time.sleep(1)
        subprocess.run(["scancel", str(job_id)], env=self.env, timeout=30)
        raise TimeoutError(f"SLURM job {job_id} did not finish within {timeout:.0f}s: {self.job_state(job_id)}")


def _write_config(root: Path, node: str) -> Path:
    for sub in ("state", "spool", "log", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "plugstack.conf").write_text("")
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=seqpartest",
        "SlurmctldHost=localhost",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire also sets how long SLURM holds a requeued job (default 120 s + 1): the preemption test
        # waits for that hold instead of forcing an earlier start, which raced the credential revocation
        # ("Killing non-startable batch job: Job credential revoked")
        f"AuthInfo=socket={root}/run/munge.socket,cred_expire={CRED_EXPIRE_S}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/run/slurmctld.pid",
        f"SlurmdPidFile={root}/run/slurmd.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd.log",
        f"PlugStackConfig={root}/plugstack.conf",
        "MpiDefault=none",
        "ReturnToService=2",
        "JobCompType=jobcomp/none",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        "",
    ]))
    return conf


def _stop(pid_file: Path) -> None:
    if not pid_file.exists():
        return
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, ValueError):
        pass


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = ensure_slurm_installed()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    node = socket.gethostname().split(".")[0]  # the node name must resolve: rendezvous uses SLURM_NODELIST
    conf = _write_config(root, node)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    run = root / "run"
    started = []
    try:
        subprocess.run(["munged", "--force", f"--key-file={root}/munge.key", f"--socket={run}/munge.socket",
                        f"--pid-file={run}/munged.pid", f"--log-file={root}/log/munged.log",
                        f"--seed-file={run}/munge.seed"], check=True, env=env, timeout=30)
        started.append(run / "munged.pid")
        subprocess.run(["slurmctld", "-i", "-f", str(conf)], check=True, env=env, timeout=30)
        started.append(run / "slurmctld.pid")
        subprocess.run(["slurmd", "-N", node, "-f", str(conf)], check=True, env=env, timeout=30)
        started.append(run / "slurmd.pid")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env).stdout
            if "idle" in out:
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"the test SLURM node never became idle; see {root}/log")
        yield SlurmCluster(root, node, env)
    finally:
        for pid_file in reversed(started):
            _stop(pid_file)
