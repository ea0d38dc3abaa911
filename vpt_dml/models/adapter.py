"""AdaptFormer-style bottleneck adapters (Chen et al., NeurIPS 2022) on timm ViT blocks.

Adapter(x) = s * Up(ReLU(Down(x))), Down: D -> b, Up: b -> D (b = 64 in the paper).
Up starts at zero, so an adapted ViT equals the plain one before training.
- parallel:   x = x + MLP(LN2(x)) + Adapter(x)          (AdaptFormer's default)
- sequential: m = MLP(LN2(x)); x = x + m + Adapter(m)
`norm` adds the VPTSP reference's optional LayerNorm before Down ("pre") or after the
scaled Up ("post"); AdaptFormer itself uses none.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from vpt_dml.errors import UserError
from vpt_dml.models.families import adaptable_block

STYLES = ("parallel", "sequential")
NORMS = ("none", "pre", "post")


class Adapter(nn.Module):
    def __init__(
        self, dim: int, bottleneck: int = 64, scale: float = 0.1, norm: str = "none"
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise UserError(f"model.peft.adapter.norm={norm!r} is not one of {NORMS}")
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.norm = nn.LayerNorm(dim) if norm != "none" else None
        self.norm_position = norm
        self.scale = scale
        # AdaptFormer's "lora" init: kaiming-uniform down, zero up and biases
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_position == "pre":
            x = self.norm(x)
        out = self.up(torch.relu(self.down(x))) * self.scale
        if self.norm_position == "post":
            out = self.norm(out)
        return out


class AdaptedFeedForward(nn.Module):
    """Replaces a block's (norm2, mlp) pair: the block then computes x + ls2(this(x)).

    The block's own LayerNorm moves in here because the parallel adapter reads the
    un-normalised residual stream x, which the block's mlp never sees.
    """

    def __init__(self, norm: nn.Module, mlp: nn.Module, adapter: Adapter, style: str) -> None:
        super().__init__()
        self.norm = norm
        self.mlp = mlp
        self.adapter = adapter
        self.style = style

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp(self.norm(x))
        return m + self.adapter(x if self.style == "parallel" else m)


def add_adapters(
    vit: VisionTransformer,
    bottleneck: int = 64,
    scale: float = 0.1,
    style: str = "parallel",
    norm: str = "none",
    num_blocks: int | None = None,
) -> list[Adapter]:
    """Adapters on the last `num_blocks` blocks (all by default); returns them (trainable)."""
    if style not in STYLES:
        raise UserError(f"model.peft.adapter.style={style!r} is not one of {STYLES}")
    blocks = list(vit.blocks)
    chosen = (
        blocks
        if num_blocks is None
        else blocks[len(blocks) - max(min(num_blocks, len(blocks)), 0) :]
    )
    adapters = []
    for blk in chosen:
        if not adaptable_block(blk) or isinstance(blk.mlp, AdaptedFeedForward):
            raise UserError(
                f"adapters need timm's pre-norm Block or EvaBlock, got {type(blk).__name__}; "
                "use another model.peft for this backbone"
            )
        adapter = Adapter(vit.embed_dim, bottleneck, scale, norm)
        blk.mlp = AdaptedFeedForward(blk.norm2, blk.mlp, adapter, style)
        blk.norm2 = nn.Identity()
        adapters.append(adapter)
    return adapters
