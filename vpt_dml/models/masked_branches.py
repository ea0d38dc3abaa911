"""The fused branch pass for timm's `Eva` blocks: timm's own blocks on one G*B batch.

`PromptedViT.forward_branches` runs G prompt sets (VPTSP's image and semantic branch)
over the same images in one pass. For timm's plain ViT `Block` it re-implements the block
with K/V-only prompts (prompted_vit.py). An `Eva` block (EVA-02, DINOv3, PE: fused or
separate qkv, q/v biases, RoPE, gated or scale-normed attention, SwiGLU, layer scale) is
called as timm wrote it instead: each branch's prompts are padded to the layer's longest
prompt with zero tokens, the padded tokens are masked out as keys (`attn_mask`, which the
Eva attention passes to SDPA), the prompt rows get identity rotary rows as in the two-pass
forward (models/families.py), and the prompt outputs are dropped. So each branch's patch
and prefix tokens see exactly the keys of its own two-pass forward: the same maths, float
summation order aside. What is saved against two passes: the patch embedding once, one
batch of G*B through every layer (adapters and LoRA included, as the block calls them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.models.eva import Eva, EvaBlock, EvaBlockPostNorm

from vpt_dml.models.families import with_prompt_rows


def fuses_by_mask(vit: nn.Module) -> bool:
    """timm's Eva with timm's own Eva blocks (their forward takes rope and attn_mask)."""
    return isinstance(vit, Eva) and all(type(b) in (EvaBlock, EvaBlockPostNorm) for b in vit.blocks)


def masked_branch_block(
    num_prefix: int,
    blk: nn.Module,
    x: torch.Tensor,
    prompts: Sequence[torch.Tensor | None],
    _keep: None,
    rope: torch.Tensor | None = None,
) -> torch.Tensor:
    """timm's block on x (G*B, T, D) with branch g's prompts (None, (n, D) or (B, n, D))."""
    lengths = [0 if p is None else p.shape[-2] for p in prompts]
    n = max(lengths)
    if n == 0:
        return blk(x) if rope is None else blk(x, rope=rope)
    groups, width = len(prompts), x.shape[-1]
    batch = x.shape[0] // groups
    rows = []
    for prompt, m in zip(prompts, lengths, strict=True):
        tokens = x.new_zeros(batch, n - m, width)
        if m:
            p = prompt.to(x.dtype)
            p = p.expand(batch, -1, -1) if p.dim() == 2 else p
            tokens = torch.cat([p, tokens], dim=1)
        rows.append(tokens)
    seq = torch.cat([x[:, :num_prefix], torch.cat(rows), x[:, num_prefix:]], dim=1)
    mask = None
    if len(set(lengths)) > 1:  # padded prompt tokens are no one's keys
        valid = torch.arange(n, device=x.device) < torch.tensor(lengths, device=x.device)[:, None]
        valid = valid.repeat_interleave(batch, dim=0)  # (G*B, n)
        ones = valid.new_ones(x.shape[0], 1)
        mask = torch.cat(
            [ones.expand(-1, num_prefix), valid, ones.expand(-1, x.shape[1] - num_prefix)], dim=1
        )[:, None, None, :]  # (G*B, 1, 1, T + n): True = attend
    out = blk(seq, rope=None if rope is None else with_prompt_rows(rope, n), attn_mask=mask)
    return torch.cat([out[:, :num_prefix], out[:, num_prefix + n :]], dim=1)
