"""Tests through a real one-node Slurm (tests/slurm/cluster.sh): started once per session,
skipped with the script's own reason when it cannot run here (not root, no packages)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "cluster.sh"


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """The partition the tests submit to; the cluster is left running (cheap, idempotent)."""
    if shutil.which("bash") is None:
        pytest.skip("no bash to run tests/slurm/cluster.sh")
    started = subprocess.run(
        ["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=600
    )
    said = (started.stdout + started.stderr).strip().splitlines()
    up = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, timeout=30)
    if up.returncode != 0 or shutil.which("slurmctld") is None:
        pytest.skip(said[-1] if said else "tests/slurm/cluster.sh start: no Slurm cluster")
    return "cpu"


@pytest.fixture(autouse=True)
def _needs_slurm(slurm_cluster: str) -> None:
    """Every test in this folder goes through sbatch."""
