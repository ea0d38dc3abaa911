"""vpt_dml.report on real sweeps through the command line: a seed sweep on the demo data,
and a submitit sweep folder with a failed job."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from tests.conftest import REPO, run_cli, tiny_overrides
from tests.runs.test_report import read_csv
from vpt_dml.report import main


@pytest.mark.slow
def test_seed_sweep_on_demo_data_reports_mean_std_and_interval(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *tiny_overrides("eval_before_training=false"),
        "seed=0,1,2",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = run_cli(args, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert main([str(sweep)]) == 0
    header, rows = read_csv(sweep / "report.csv")
    assert len(rows) == 1 and rows[0]["n"] == "3"
    runs = [json.loads(f.read_text())["metrics"] for f in sorted(sweep.rglob("metrics.json"))]
    assert len(runs) == 3
    t = stats.t.ppf(0.975, df=2)
    spread = 0.0
    for metric in ("recall@1", "map@r", "r_precision"):
        x = np.array([r[metric] for r in runs])
        mean, std = x.mean(), x.std(ddof=1)
        half = t * std / math.sqrt(3)
        row = rows[0]
        assert float(row[metric]) == pytest.approx(100 * mean, abs=0.006)
        assert float(row[f"{metric} std"]) == pytest.approx(100 * std, abs=0.006)
        low, high = float(row[f"{metric} ci95 low"]), float(row[f"{metric} ci95 high"])
        assert low == pytest.approx(100 * (mean - half), abs=0.006)
        assert high == pytest.approx(100 * (mean + half), abs=0.006)
        assert all(low <= 100 * v <= high for v in x)
        spread += std
    assert spread > 0  # the seeds really gave different runs


@pytest.mark.both_cores
@pytest.mark.slow
def test_submitit_sweep_folder_lists_failed_jobs_with_their_error_line(
    tmp_path: Path, local_sweep
) -> None:
    """A real sweep through submitit's local launcher (hydra/launcher=local over Hydra's
    submitit_local; real subprocesses; the session's, conftest.local_sweep): one job
    finishes, one is refused by our config check (an `error:` line, exit 2, in submitit's
    log). A task that raises instead (Hydra's launcher keeps the exception in the result
    pickle) is read the same way (reporting/jobs.py)."""
    sweep = local_sweep["dir"]
    assert local_sweep["proc"].returncode != 0  # one of its jobs failed
    assert len(list(sweep.rglob("metrics.json"))) == 1
    assert (sweep / ".submitit").is_dir()
    assert main([str(sweep), "--out", str(tmp_path / "report")]) == 0
    _, rows = read_csv(tmp_path / "report.csv")
    by_lr = {r["optim.lr"]: r for r in rows}
    assert [(r["optim.lr"], r["eval"]) for r in rows] == [("0.001", "final"), ("abc", "failed")]
    note = by_lr["abc"]["note"]
    assert note.startswith("[job ") and "error: optim.lr='abc' has the wrong type" in note
