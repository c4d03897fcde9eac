"""Session fixtures shared by several test modules (a fixture imported into two modules would run twice)."""

from __future__ import annotations

import pytest

from tests.dist import start_fork_server
from tests.resume_harness import torchrun
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (registered once here: one cluster per session)
from tests.sp_dp_runs import SpDpRuns


@pytest.fixture(scope="session", autouse=True)
def compiled_linear_kernel():
    """Build the compiled CPU linear-attention kernel once, here, before any spawned rank or subprocess needs
    it (they then only load it; a ~30 s build inside a rank would count against that test's timeouts)."""
    from seqpar.kernels import linear_cpu

    extension = linear_cpu.extension()
    start_fork_server()  # the ranks of tests/dist.py's run_ranks fork from it (after the build: its environment)
    return extension


@pytest.fixture(scope="session")
def quickstart_reference(tmp_path_factory):
    """Output folder of one uninterrupted quick-start run (tests/resume_harness.py's overrides)."""
    out = tmp_path_factory.mktemp("reference") / "clean"
    torchrun(out)
    return out


@pytest.fixture(scope="session")
def sp_dp_runs(tmp_path_factory):
    """The SP 2 x DP 2 quick start on 4 processes and its one-process twin (tests/sp_dp_runs.py), each trained
    once for tests/test_fsdp2.py, tests/test_multinode.py and tests/test_train.py."""
    runs = SpDpRuns(tmp_path_factory.mktemp("sp_dp"))
    yield runs
    runs.close()
