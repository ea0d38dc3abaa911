"""The image branch, which is also the whole inference model:
f(x) = normalize(Head(LN_final(ViT_with_P(x))[CLS])).

Built by `vpt_dml.models.build.build_embedder` (the one place the model is assembled).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vpt_dml.models.prompted_vit import PromptedViT


class Embedder(nn.Module):
    def __init__(self, backbone: PromptedViT, head: nn.Module | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def feature_dim(self) -> int:
        return self.backbone.dim

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features -> L2-normalised embeddings."""
        return self.head(feats) if self.head is not None else F.normalize(feats, dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.backbone(images))
