"""A two-task job through srun: DDP on CPU, each task a process Slurm started and Lightning
joined through its SLURM environment (SLURM_PROCID / SLURM_NTASKS), equals Lightning's own
two-process launch of trainer=ddp_cpu."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides
from tests.slurm.helpers import SLURM, env, metrics, start

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def ddp(*extra: str) -> list[str]:
    """The tiny settings without their one-device trainer keys."""
    keep = [
        o
        for o in tiny_overrides("eval_before_training=false", *extra)
        if not o.startswith(("trainer.devices=", "trainer.strategy="))
    ]
    return ["trainer=ddp_cpu", *keep]


@pytest.mark.timeout(600)
def test_two_srun_tasks_equal_lightnings_ddp_cpu_launch(tmp_path: Path) -> None:
    # 8 training classes: a DDP step draws 2 x 4 distinct ones
    data = ["data.synthetic.num_classes=16", "data.synthetic.images_per_class=8"]
    settings = ddp(*data, "trainer.max_epochs=2", "seed=0")
    job_dir, local = tmp_path / "job", tmp_path / "local"
    job_dir.mkdir()
    local.mkdir()
    # tasks_per_node follows trainer.devices (2), one CPU each: the whole test node
    proc = start(
        ["-m", *SLURM, *settings, f"paths.data_dir={job_dir / 'data'}",
         f"hydra.sweep.dir={job_dir / 'sweep'}"],
        job_dir,
    )  # fmt: skip
    spawned = subprocess.run(
        [sys.executable, "-m", "vpt_dml.run", *settings, f"paths.data_dir={local / 'data'}",
         f"hydra.run.dir={local / 'run'}"],
        cwd=local, env=env(), capture_output=True, text=True, timeout=500,
    )  # fmt: skip
    assert spawned.returncode == 0, spawned.stderr[-3000:]
    out, _ = proc.communicate(timeout=500)
    assert proc.returncode == 0, out[-4000:]
    sbatch = next((job_dir / "sweep" / ".submitit").rglob("*_submission.sh")).read_text()
    assert "--ntasks-per-node=2" in sbatch and "srun" in sbatch
    a = json.loads((local / "run" / "metrics.json").read_text())
    b = metrics(job_dir / "sweep" / "0")
    assert a["provenance"]["world_size"] == b["provenance"]["world_size"] == 2
    assert b["status"] == "finished"
    assert a["metrics"].keys() == b["metrics"].keys()
    for key, value in a["metrics"].items():  # float32 maths, the same reductions
        assert b["metrics"][key] == pytest.approx(value, abs=1e-6), key
