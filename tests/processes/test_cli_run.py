"""`python -m vpt_dml.run` as a user runs it: a subprocess, with Hydra's own parsing; the
run folder and metrics.json it leaves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, run_cli, tiny_overrides

pytestmark = pytest.mark.slow


def test_cli_run_dir_and_metrics(tmp_path: Path):
    """The command's own wiring, in a fresh interpreter (fork=False): every other CLI test
    may fork its child from the suite's fork server (tests/forkserver.py)."""
    run_dir = tmp_path / "my_run"
    res = run_cli(
        [
            *tiny_overrides("trainer.max_epochs=1"),
            f"hydra.run.dir={run_dir}",
            f"paths.data_dir={tmp_path / 'data'}",
        ],
        cwd=REPO,
        fork=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert set(metrics) >= {"recall@1", "map@r", "recall@1_before"}
    assert "recall@1" in res.stdout  # the summary table
