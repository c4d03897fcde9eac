"""Session fixtures shared by several test modules (a fixture imported into two modules would run twice)."""

from __future__ import annotations

import pytest

from tests.resume_harness import torchrun
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (registered once here: one cluster per session)


@pytest.fixture(scope="session")
def quickstart_reference(tmp_path_factory):
    """Output folder of one uninterrupted quick-start run (tests/resume_harness.py's overrides)."""
    out = tmp_path_factory.mktemp("reference") / "clean"
    torchrun(out)
    return out
