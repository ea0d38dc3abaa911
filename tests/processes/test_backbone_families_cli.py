"""A backbone family through the command line: the distilled two-token DeiT trains in a
child `python -m vpt_dml.run` (the in-process proofs: tests/runs/test_backbone_families.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_config, run_cli, tiny_overrides

from tests.runs.test_presets import recomputed_recall_at_1


@pytest.mark.slow
def test_distilled_deit_trains_through_the_cli(tmp_path: Path):
    run_dir = tmp_path / "run"
    overrides = [
        *tiny_overrides(
            "model/backbone=timm",  # any timm ViT by name (the demo's option is for its own)
            "model.backbone.name=deit_tiny_distilled_patch16_224",
            "eval_before_training=false",
        ),
        "+trainer.limit_train_batches=1",
    ]
    res = run_cli(
        [
            *overrides,
            f"hydra.run.dir={run_dir}",
            f"paths.data_dir={tmp_path / 'data'}",
        ],
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["provenance"]["global_step"] == 1
    # the reported Recall@1 is that of the trained DeiT (distillation token and all)
    cfg = compose_config(overrides, tmp_path)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    want = recomputed_recall_at_1(cfg, state)
    assert result["metrics"]["recall@1"] == pytest.approx(want, abs=1e-6)
