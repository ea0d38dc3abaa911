"""LoRA on the fused qkv projection of every ViT block, via the `peft` library.

peft's LoRA Linear wraps timm's `attn.qkv` in place (base_layer + lora_A/lora_B), so the
timm forward is unchanged: qkv(x) = W x + b + (alpha / r) * B A x, B = 0 at start.
`pip install 'vpt_dml[peft]'` provides the library.
"""

from __future__ import annotations

import torch
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
    if "qkv" in targets:
        call_qkv_module(vit)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets)
    )
    try:
        inject_adapter_in_model(config, vit)
    except ValueError as e:
        names = block_linears(vit)
        qkv = [n for n in names if n.endswith(("qkv", "_proj"))] or ["qkv"]
        raise UserError(
            f"model.peft.lora.targets={list(targets)} fits no layer of the backbone ({e}); "
            f"its blocks name their Linear layers {', '.join(names)}: for the attention's "
            f"input projections, model.peft.lora.targets=[{','.join(qkv)}]"
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
    refuse_bypassed(vit, targets)
    return params


def block_linears(vit: nn.Module) -> list[str]:
    """The last name part of every Linear layer in the first block (qkv, proj, fc1, ...;
    q_proj, k_proj, v_proj for an EVA-02 with separate projections)."""
    blocks = getattr(vit, "blocks", None)
    first = blocks[0] if blocks is not None and len(blocks) else vit
    names = [n.rsplit(".", 1)[-1] for n, m in first.named_modules() if isinstance(m, nn.Linear)]
    return list(dict.fromkeys(names))


def call_qkv_module(vit: nn.Module) -> None:
    """timm's EvaAttention (EVA-02, DINOv3 *_qkvb) with q/v biases computes
    F.linear(x, qkv.weight, bias) and never calls `qkv`, so a LoRA wrapper there would be
    skipped; its `qkv_bias_separate` switch calls `qkv(x)` and adds the same biases after
    (same maths, float summation order aside)."""
    for m in vit.modules():
        if (
            getattr(m, "qkv_bias_separate", None) is False
            and getattr(m, "q_bias", None) is not None
        ):
            m.qkv_bias_separate = True


def refuse_bypassed(vit: nn.Module, targets) -> None:
    """One forward of a blank image: every LoRA-wrapped layer must be called, or LoRA would
    train parameters the backbone's forward never reads (a module that reads `.weight`)."""
    wrapped = {
        n: m for n, m in vit.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")
    }
    called: set[str] = set()
    hooks = [
        m.register_forward_hook(lambda mod, args, out, n=n: called.add(n))
        for n, m in wrapped.items()
    ]
    size = tuple(getattr(vit.patch_embed, "img_size", None) or (224, 224))
    chans = getattr(vit.patch_embed.proj, "in_channels", 3)
    param = next(vit.parameters())
    if param.is_meta:  # built for its structure only: nothing to run
        return
    was_training = vit.training
    try:
        vit.eval()
        with torch.no_grad():
            vit.forward_features(
                torch.zeros(1, chans, *size, dtype=param.dtype, device=param.device)
            )
    finally:
        vit.train(was_training)
        for h in hooks:
            h.remove()
    skipped = [n for n in wrapped if n not in called]
    if skipped:
        raise UserError(
            f"model.peft.lora.targets={list(targets)}: {len(skipped)} of {len(wrapped)} wrapped "
            f"layers (e.g. {skipped[0]}) are never called by {type(vit).__name__}'s forward, so "
            "LoRA would not act there; choose other targets (proj, fc1, fc2) or another model.peft"
        )
