"""A timm VisionTransformer that takes prompt tokens at chosen layers (VPT).

At layer l, n_l prompt tokens are inserted right after the prefix tokens (CLS, and
register/distillation tokens where the model has them), the block runs, and the prompt
outputs are dropped, so every layer sees fresh prompts ("VPT-deep"; "VPT-shallow" is
layer 0 only). Prompts get no position embedding. The reference code prepends them before
CLS instead; without position embeddings a block is permutation-equivariant, so the
place in the sequence does not change any output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer
from torch.utils.checkpoint import checkpoint


def layer_counts(num: int, depth: int, step: int, num_layers: int) -> list[int]:
    """N_l = max(num - l*step, 0) for l < depth, else 0 (METHOD.md §1)."""
    return [max(num - layer * step, 0) if layer < depth else 0 for layer in range(num_layers)]


def xavier_normal_tokens(*shape: int, keep: int | None = None) -> torch.Tensor:
    """Prompt init of the reference code: torch's xavier-normal on a (length, num, D) tensor.

    A 2-d shape (num, D) means length 1 (one shared set). torch's fans for a 3-d tensor are
    fan_in = num*D and fan_out = length*D, so std = sqrt(2 / ((num + length) * D)): for
    class prompts the std shrinks with the number of classes, as in the reference. The
    reference initialises every layer at the full count N and slices the first N_l tokens
    (prompt block step); `keep` does that slice.
    """
    full = shape if len(shape) == 3 else (1, *shape)
    tokens = nn.init.xavier_normal_(torch.empty(full))
    tokens = tokens[:, :keep] if keep is not None else tokens
    return tokens.reshape(*shape[:-2], tokens.shape[1], shape[-1]).clone()


class PromptTokens(nn.Module):
    """Shared prompts P_l: one learnable (n_l, D) tensor per prompted layer."""

    def __init__(self, counts: Sequence[int], dim: int) -> None:
        super().__init__()
        self.counts = list(counts)
        full = max(self.counts, default=0)  # N: layer 0's count; deeper layers keep a prefix
        self.tokens = nn.ParameterList(
            [nn.Parameter(xavier_normal_tokens(full, dim, keep=n)) for n in self.counts if n > 0]
        )

    def per_layer(self) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        it = iter(self.tokens)
        for n in self.counts:
            out.append(next(it) if n > 0 else None)
        return out


class PromptedViT(nn.Module):
    """Runs a timm ViT with per-layer prompts; returns the pooled pre-logits feature."""

    def __init__(self, vit: VisionTransformer, prompt_counts: Sequence[int] = ()) -> None:
        super().__init__()
        self.vit = vit
        self.num_layers = len(vit.blocks)
        self.dim = vit.embed_dim
        counts = list(prompt_counts) + [0] * (self.num_layers - len(prompt_counts))
        self.prompts = PromptTokens(counts[: self.num_layers], self.dim)
        self.grad_checkpointing = False

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def _block(self, layer: int, x: torch.Tensor, prompt: torch.Tensor | None) -> torch.Tensor:
        blk = self.vit.blocks[layer]
        if prompt is None or prompt.shape[-2] == 0:
            return blk(x)
        p = self.vit.num_prefix_tokens
        if prompt.dim() == 2:
            prompt = prompt.expand(x.shape[0], -1, -1)
        n = prompt.shape[1]
        x = torch.cat([x[:, :p], prompt.to(x.dtype), x[:, p:]], dim=1)
        x = blk(x)
        return torch.cat([x[:, :p], x[:, p + n :]], dim=1)

    def forward(
        self, images: torch.Tensor, prompts: Sequence[torch.Tensor | None] | None = None
    ) -> torch.Tensor:
        """`prompts[l]` is (n_l, D) shared or (B, n_l, D) per sample; None uses P."""
        if prompts is None:
            prompts = self.prompts.per_layer()
        x = self.embed(images)
        for layer in range(self.num_layers):
            prompt = prompts[layer] if layer < len(prompts) else None
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(self._block, layer, x, prompt, use_reentrant=False)
            else:
                x = self._block(layer, x, prompt)
        x = self.vit.norm(x)
        return self.vit.forward_head(x, pre_logits=True)
