"""A two-point sweep on the demo data through the CLI, tabled by vpt_dml.report."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli, tiny_overrides


@pytest.mark.slow
def test_two_point_prompt_length_sweep_is_reported(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    args = [
        "-m",
        "+hparams_search=prompt_length",
        *tiny_overrides("eval_before_training=false"),
        "model.peft.prompts.num=1,4",
        "model.peft.prompts.depth=2",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.parent.name for p in sweep_dir.rglob("metrics.json")) == ["0", "1"]

    report = subprocess.run(
        [sys.executable, "-m", "vpt_dml.report", str(sweep_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stderr
    rows = list(csv.reader((sweep_dir / "report.csv").open()))
    assert rows[0][:2] == ["run", "model.peft.prompts.num"] and "recall@1" in rows[0]
    assert sorted(r[1] for r in rows[1:]) == ["1", "4"]
    # the runs really differ in their trainable parameter count (prompt tokens)
    assert len({r[-1] for r in rows[1:]}) == 2
    assert (sweep_dir / "report.png").stat().st_size > 0


@pytest.mark.slow
def test_sweep_with_multi_device_ddp_is_refused(tmp_path: Path) -> None:
    args = [
        "-m",
        *tiny_overrides(),
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "seed=0,1",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 2
    assert "error: a sweep (-m) cannot run trainer.strategy=ddp" in proc.stderr
