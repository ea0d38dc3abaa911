"""`model.backbone.name=X` with an option whose settings describe another model is refused
in one line naming model/backbone=timm (issue 28, 1), through the command line in process
(the composition and the built model: tests/unit/test_backbone_options.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, cli_in_process


@pytest.mark.parametrize("pretrained", ["false", "true"])
def test_a_name_without_its_option_is_one_line_refusal(pretrained: str, tmp_path: Path):
    """The issue's command: the demo's option, another name. Refused before anything is
    built or pretrained (no demo weights file is made)."""
    res = cli_in_process(
        [
            "model.backbone.name=vit_small_patch16_224",
            f"model.backbone.pretrained={pretrained}",
            f"hydra.run.dir={tmp_path / 'run'}",
            f"paths.data_dir={tmp_path / 'data'}",
        ],
        cwd=REPO,
    )
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in res.stderr
    assert any(
        "keeps the backbone option's settings for vit_tiny_patch16_224" in ln
        and f"model/backbone=timm model.backbone.name=vit_small_patch16_224 "
        f"model.backbone.pretrained={pretrained}"
        in ln
        for ln in lines
    ), res.stderr[-2000:]
    assert not (tmp_path / "data" / "demo_backbone").exists()
    assert not (tmp_path / "run" / "metrics.json").exists()
