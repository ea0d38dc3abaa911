"""The 2026 backbones through the suite's own commands (issue 33): tiny end-to-end runs
through `python -m vpt_dml.run` (pretrained=False, tiny kwargs), DINOv3 (timm Eva) and
SigLIP (map pool) with model/peft=vptsp (VPTSP-G) and model/peft=lora; metrics.json
finished, the built class recorded. (The documented commands' composition:
tests/unit/test_backbone_family_commands.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, run_cli, tiny_overrides

# run -> (timm name, PEFT option, class, pool as timm defines it)
RUNS = {
    "dinov3-vptsp": ("vit_small_patch16_dinov3", "model/peft=vptsp", "Eva", "avg"),
    "dinov3-lora": ("vit_small_patch16_dinov3", "model/peft=lora", "Eva", "avg"),
    "siglip-vptsp": ("vit_base_patch16_siglip_224", "model/peft=vptsp", "VisionTransformer", "map"),
    "siglip-lora": ("vit_base_patch16_siglip_224", "model/peft=lora", "VisionTransformer", "map"),
}


@pytest.mark.slow
@pytest.mark.parametrize("run", list(RUNS))
def test_tiny_run_through_the_cli_finishes(run, tmp_path: Path):
    name, peft, cls, pool = RUNS[run]
    run_dir = tmp_path / "run"
    res = run_cli(
        [
            *tiny_overrides(
                "model/backbone=timm",
                f"model.backbone.name={name}",
                "model.backbone.pretrained=false",
                "++model.backbone.kwargs={img_size: 32, patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2}",
                peft,
                "model/proxy=semantic_gru",
                "eval_before_training=false",
            ),
            "+trainer.limit_train_batches=2",
            f"hydra.run.dir={run_dir}",
            f"paths.data_dir={tmp_path / 'data'}",
        ],
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["status"] == "finished"
    assert result["provenance"]["global_step"] == 2
    built = result["provenance"]["backbone"]["built"]
    assert (built["class"], built["pooling"]["pool"]) == (cls, pool)
    assert 0.0 <= result["metrics"]["recall@1"] <= 1.0
