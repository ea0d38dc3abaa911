"""LoRA on the fused qkv projection of every ViT block, via the `peft` library.

peft's LoRA Linear wraps timm's `attn.qkv` in place (base_layer + lora_A/lora_B), so the
timm forward is unchanged: qkv(x) = W x + b + (alpha / r) * B A x, B = 0 at start.
`pip install 'vpt_dml[peft]'` provides the library.
"""

from __future__ import annotations

import torch.nn as nn

from vpt_dml.errors import UserError


def add_lora(
    vit: nn.Module, rank: int = 8, alpha: float = 8.0, dropout: float = 0.0, targets=("qkv",)
) -> list[nn.Parameter]:
    """Inject LoRA into the `targets` Linear layers; returns the new (trainable) parameters."""
    if rank < 1:
        raise UserError(f"model.peft.lora.rank={rank} must be >= 1")
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UserError(
            "model.peft.lora needs the peft library; install it with pip install 'vpt_dml[peft]'"
        ) from None
    # peft freezes every non-LoRA parameter it sees; keep the caller's choice instead
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets)
    )
    try:
        inject_adapter_in_model(config, vit)
    except ValueError as e:
        raise UserError(
            f"model.peft.lora.targets={list(targets)} fits no layer of the backbone ({e}); "
            "timm ViTs name theirs qkv, proj, fc1, fc2"
        ) from None
    params = []
    for name, p in vit.named_parameters():
        if ".lora_" in name:
            p.requires_grad_(True)
            params.append(p)
        else:
            # peft renames a wrapped Linear's weight to <name>.base_layer.weight
            p.requires_grad_(name.replace(".base_layer", "") in trainable)
    if not params:
        raise UserError(f"model.peft.lora.targets={list(targets)} matched no layer of the backbone")
    return params
