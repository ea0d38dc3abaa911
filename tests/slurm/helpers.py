"""Sweeps through the real one-node Slurm: the documented command, tiny settings."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests import processes
from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]

# 1 GB per job: both jobs of a sweep fit the test node at once (it has 2 CPUs)
SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=cpu",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.cpus_per_task=1",
]


def sweep_args(tmp_path: Path, *extra: str) -> list[str]:
    given = {o.split("=", 1)[0] for o in extra}
    return [
        "-m",
        *[o for o in SLURM if o.split("=", 1)[0] not in given],
        *tiny_overrides("eval_before_training=false", *extra),
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]


def env() -> dict:
    return {
        **os.environ,
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "VPT_SLURM_POLL_S": "2",
        # the jobs import tests.slurm.slow_steps (a callback) from this checkout
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }


def run(args: list[str], cwd: Path, timeout: int = 240, module: str = "vpt_dml.run"):
    """The command, to its end (forked from the suite's fork server: tests/processes.py);
    the jobs it submits are fresh interpreters that Slurm starts."""
    return processes.run(processes.python("-m", module, *args), cwd=cwd, env=env(), timeout=timeout)


def start(args: list[str], cwd: Path):
    """The command, running: stdout and stderr in one pipe (a Popen-like handle)."""
    return processes.launch(
        processes.python("-m", "vpt_dml.run", *args),
        cwd=cwd,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def squeue_ids() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    return set(out.split())


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error:")]
