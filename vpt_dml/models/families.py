"""Which timm classes the prompted forward serves, and what differs between them.

Two timm classes share one prompted forward (models/prompted_vit.py):
- `VisionTransformer` (in21k ViT, CLIP with norm_pre, DINOv2 with registers and layer
  scale, SigLIP with attention pooling `map`, DeiT): absolute position embeddings only.
- `Eva` (EVA-02, DINOv3, Perception Encoder): absolute and/or rotary (RoPE) position
  embeddings. Its blocks take `blk(x, rope=...)`, and its attention rotates q and k of
  every token after the first `num_prefix_tokens` (CLS, registers) with the rope rows,
  one row per patch.

Prompt tokens carry no position (METHOD.md §1). In an `Eva` they sit after the prefix
tokens, and the rope tensor gets one identity row per prompt token in front of the patch
rows (sin = 0, cos = 1: x * 1 + rot(x) * 0 = x exactly): the prompts are not rotated,
every patch keeps its own rotation, prefix tokens stay unrotated as timm keeps them.
`tests/test_backbone_eva.py` checks this against timm's own way of exempting tokens
from RoPE (counting the prompts as prefix tokens).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.eva import Eva, EvaBlock
from timm.models.vision_transformer import Block, VisionTransformer

from vpt_dml.errors import UserError

SERVED = (VisionTransformer, Eva)


def is_served(model: nn.Module) -> bool:
    return isinstance(model, SERVED)


def refuse_unserved(model: nn.Module, name: str) -> None:
    """One line naming the backbone and the families served, for any other class."""
    if not is_served(model):
        raise UserError(
            f"{name} is a {type(model).__name__}, not a timm VisionTransformer or Eva (the classes "
            "the prompted forward serves); pick a ViT (vit_*, deit_*: in21k, CLIP, DINOv2, SigLIP) "
            "or an Eva (eva02_*, vit_*_dinov3, vit_pe_core_*)"
        )


def embed(vit: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens before the first block, as timm's forward_features makes them, and the rope
    rows of an `Eva` (None for a VisionTransformer or an Eva without RoPE)."""
    x = vit.patch_embed(images)
    if isinstance(vit, Eva):  # pos embed, pos/patch dropout and the rope rows together
        x, rope = vit._pos_embed(x)
        return vit.norm_pre(x), rope
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x), None


def layer_rope(vit: nn.Module, rope: torch.Tensor | None, layer: int) -> torch.Tensor | None:
    """The rope rows block `layer` reads: per layer for timm's mixed RoPE, else shared."""
    if rope is not None and getattr(vit, "rope_mixed", False):
        return rope[layer]
    return rope


def repeat_for_branches(vit: nn.Module, rope: torch.Tensor | None, groups: int):
    """The rope rows for G branches stacked along the batch (x.repeat(G, 1, 1)): only a rope
    with a batch dim (timm's patch dropout keeps different patches per sample) repeats."""
    if rope is None or groups == 1:
        return rope
    mixed = getattr(vit, "rope_mixed", False)
    if rope.dim() != (5 if mixed else 4):  # (depth,) (heads,) N, dim: shared by every sample
        return rope
    return torch.cat([rope] * groups, dim=1 if mixed else 0)


def with_prompt_rows(rope: torch.Tensor, n: int) -> torch.Tensor:
    """`rope` (..., N, 2*half) with n identity rows in front: prompt tokens are not rotated.

    timm stores rope rows as [sin, cos] along the last dim (apply_rot_embed_cat)."""
    half = rope.shape[-1] // 2
    ident = torch.cat([rope.new_zeros(half), rope.new_ones(rope.shape[-1] - half)])
    rows = ident.expand(*rope.shape[:-2], n, rope.shape[-1])
    return torch.cat([rows, rope], dim=-2)


def run_block(blk: nn.Module, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
    return blk(x) if rope is None else blk(x, rope=rope)


def adaptable_block(blk: nn.Module) -> bool:
    """Pre-norm blocks computing x + ls(mlp(norm2(x))), which adapters can wrap (not
    EvaBlockPostNorm, which normalises the MLP's output)."""
    return isinstance(blk, (Block, EvaBlock))
