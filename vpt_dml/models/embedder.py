"""The image branch, which is also the whole inference model:
f(x) = normalize(Head(LN_final(ViT_with_P(x))[CLS])).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from vpt_dml.models.backbone import create_backbone
from vpt_dml.models.heads import EmbeddingHead
from vpt_dml.models.peft import apply_peft
from vpt_dml.models.prompted_vit import PromptedViT, layer_counts
from vpt_dml.models.synthetic_pretraining import pretrain_backbone


class Embedder(nn.Module):
    def __init__(self, backbone: PromptedViT, head: nn.Module | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def feature_dim(self) -> int:
        return self.backbone.dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(images)
        return self.head(feats) if self.head is not None else F.normalize(feats, dim=-1)


def build_embedder(cfg: Mapping) -> Embedder:
    """From the `model` config: backbone (frozen), PEFT switches (peft.py), shared prompts, head."""
    b = cfg["backbone"]
    spec = dict(b.get("synthetic_pretraining") or {})
    if spec and b.get("weights") and str(b["weights"]) == str(spec.get("output")):
        # the demo's stand-in for downloaded weights: made once, then loaded like a download.
        # Only for its own output file: a mistyped weights path must fail, not be invented.
        pretrain_backbone(b["name"], b.get("kwargs") or {}, spec.pop("output"), **spec)
    vit = create_backbone(b["name"], b.get("pretrained", False), b.get("weights"), b.get("kwargs"))
    peft = cfg["peft"]
    apply_peft(vit, peft)
    p = peft.get("prompts") or {}
    counts = layer_counts(p.get("num", 0), p.get("depth", 0), p.get("step", 0), len(vit.blocks))
    backbone = PromptedViT(vit, counts)
    backbone.grad_checkpointing = bool(cfg.get("grad_checkpointing", False))
    embed_dim = cfg.get("embed_dim")
    head = EmbeddingHead(vit.embed_dim, embed_dim) if embed_dim else None
    return Embedder(backbone, head)
