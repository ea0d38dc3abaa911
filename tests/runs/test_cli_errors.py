"""`python -m vpt_dml.run` as a user runs it, in process (cli_in_process: the command-line
checks, then Hydra's own parsing): bad input ends in one error line."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, cli_in_process, tiny_overrides

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.batch_size=7", "not a multiple of samples_per_class"),
        ("model.backbone.weights=/nonexistent/vit.safetensors", "model.backbone.weights"),
        ("model.proxy.kind=banana", "model.proxy.kind"),
        ("model.backbone.name=resnet18", "not a timm VisionTransformer"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path: Path, override: str, expected: str):
    res = cli_in_process(
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
