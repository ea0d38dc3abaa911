"""Which backbone parameters train: linear probe, BitFit, full fine-tuning.

Prompts are added by `PromptedViT`; adapters and LoRA by their own modules. Every
switch here only flips `requires_grad` on the (otherwise frozen) timm ViT.
"""

from __future__ import annotations

import torch.nn as nn


def bias_parameters(vit: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """BitFit's set: every bias of the backbone (patch embed, qkv, proj, MLPs, all norms)."""
    return [(n, p) for n, p in vit.named_parameters() if n.endswith(".bias") or n == "bias"]


def set_backbone_trainable(vit: nn.Module, bitfit: bool, full: bool) -> None:
    for p in vit.parameters():
        p.requires_grad_(full)
    if bitfit and not full:
        for _, p in bias_parameters(vit):
            p.requires_grad_(True)
