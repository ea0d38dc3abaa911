"""ProxyNCA (Movshovitz-Attias et al., 2017) with caller-supplied proxies.

Softmax over negative squared distances between scaled unit vectors, as in the Proxy
Anchor / VPTSP reference code: loss = CE(-||s*x - s*p||^2) with optional label smoothing.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _loss_dtype(x: torch.Tensor) -> torch.dtype:
    """At least float32 (half-precision activations under AMP), float64 kept."""
    return torch.promote_types(x.dtype, torch.float32)


class ProxyNCALoss(nn.Module):
    def __init__(self, scale: float = 3.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.scale = scale
        self.label_smoothing = label_smoothing

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor
    ) -> torch.Tensor:
        x = self.scale * F.normalize(embeddings.to(_loss_dtype(embeddings)), dim=-1)
        p = self.scale * F.normalize(proxies.to(_loss_dtype(embeddings)), dim=-1)
        dist = torch.cdist(x, p).pow(2)
        return F.cross_entropy(-dist, labels, label_smoothing=self.label_smoothing)
