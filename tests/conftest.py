"""Session fixtures shared by several test modules (a fixture imported into two modules would run twice)."""

from __future__ import annotations

import pytest

from tests.resume_harness import torchrun
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (registered once here: one cluster per session)


@pytest.fixture(scope="session", autouse=True)
def compiled_linear_kernel():
    """Build the compiled CPU linear-attention kernel once, here, before any spawned rank or subprocess needs
    it (they then only load it; a ~30 s build inside a rank would count against that test's timeouts)."""
    from seqpar.kernels import linear_cpu

    return linear_cpu.extension()


@pytest.fixture(scope="session")
def quickstart_reference(tmp_path_factory):
    """Output folder of one uninterrupted quick-start run (tests/resume_harness.py's overrides)."""
    out = tmp_path_factory.mktemp("reference") / "clean"
    torchrun(out)
    return out
