"""Which backbone parameters train: the `model.peft` switches, combinable.

- full: every backbone weight trains (full fine-tuning); otherwise all are frozen.
- bitfit: every bias of the backbone trains (patch embed, qkv, proj, MLPs, all norms).
- prompts {num, depth, step}: shared VPT prompts, added by `PromptedViT` (not here).
- adapter {enabled, bottleneck, scale, style, norm}: AdaptFormer bottlenecks (adapter.py).
- lora {enabled, rank, alpha, dropout, targets}: LoRA via the peft library (lora.py).
The head is always trained. "linear" = none of the above; VPTSP-G = prompts + bitfit.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn as nn

from vpt_dml.errors import UserError
from vpt_dml.models.adapter import add_adapters
from vpt_dml.models.lora import add_lora

KNOWN_KEYS = {"name", "prompts", "bitfit", "full", "adapter", "lora"}


def bias_parameters(vit: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """BitFit's set: every bias of the backbone (patch embed, qkv, proj, MLPs, all norms),
    including biases kept outside a Linear (EVA's attn.q_bias / attn.v_bias)."""
    return [(n, p) for n, p in vit.named_parameters() if n.rsplit(".", 1)[-1].endswith("bias")]


def set_backbone_trainable(vit: nn.Module, bitfit: bool, full: bool) -> None:
    for p in vit.parameters():
        p.requires_grad_(full)
    if bitfit and not full:
        for _, p in bias_parameters(vit):
            p.requires_grad_(True)


def apply_peft(vit: nn.Module, cfg: Mapping) -> None:
    """Freeze the backbone, then open what `cfg` (the model.peft node) asks for."""
    unknown = set(cfg) - KNOWN_KEYS
    if unknown:
        raise UserError(f"unknown model.peft keys {sorted(unknown)}; known: {sorted(KNOWN_KEYS)}")
    # biases first: adapters and LoRA add their own (always trainable) parameters after
    set_backbone_trainable(
        vit, bitfit=bool(cfg.get("bitfit", False)), full=bool(cfg.get("full", False))
    )
    adapter = cfg.get("adapter") or {}
    if adapter.get("enabled", False):
        add_adapters(
            vit,
            bottleneck=int(adapter.get("bottleneck", 64)),
            scale=float(adapter.get("scale", 0.1)),
            style=adapter.get("style", "parallel"),
            norm=adapter.get("norm", "none"),
            num_blocks=adapter.get("num_blocks"),
        )
    lora = cfg.get("lora") or {}
    if lora.get("enabled", False):
        add_lora(
            vit,
            rank=int(lora.get("rank", 8)),
            alpha=float(lora.get("alpha", 8.0)),
            dropout=float(lora.get("dropout", 0.0)),
            targets=tuple(lora.get("targets", ("qkv",))),
        )
