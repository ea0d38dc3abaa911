"""Plain learnable proxies (Proxy Anchor's own): one free E-dim vector per class."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LearnedProxies(nn.Module):
    def __init__(self, num_classes: int, embed_dim: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.empty(num_classes, embed_dim))
        # Proxy Anchor's init: kaiming-normal (fan_out), proxies then normalised in the loss.
        nn.init.kaiming_normal_(self.bias, mode="fan_out")

    def forward(self, images, labels, backbone) -> torch.Tensor:  # noqa: ARG002 - same call as semantic
        return F.normalize(self.bias, dim=-1)
