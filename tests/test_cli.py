"""`python -m vpt_dml.run` as a user runs it: a subprocess, with Hydra's own parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, run_cli, tiny_overrides

pytestmark = pytest.mark.slow


def test_cli_run_dir_and_metrics(tmp_path: Path):
    run_dir = tmp_path / "my_run"
    res = run_cli(
        [
            *tiny_overrides("trainer.max_epochs=1"),
            f"hydra.run.dir={run_dir}",
            f"paths.data_dir={tmp_path / 'data'}",
        ],
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert set(metrics) >= {"recall@1", "map@r", "recall@1_before"}
    assert "recall@1" in res.stdout  # the summary table


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.batch_size=7", "not a multiple of samples_per_class"),
        ("model.backbone.weights=/nonexistent/vit.safetensors", "model.backbone.weights"),
        ("model.proxy.kind=banana", "model.proxy.kind"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path: Path, override: str, expected: str):
    res = run_cli(
        [
            *tiny_overrides(override),
            f"hydra.run.dir={tmp_path / 'run'}",
            f"paths.data_dir={tmp_path / 'data'}",
        ],
        cwd=REPO,
    )
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr
