"""A timm VisionTransformer that takes prompt tokens at chosen layers (VPT).

At layer l, n_l prompt tokens are inserted right after the prefix tokens (CLS, and
register/distillation tokens where the model has them), the block runs, and the prompt
outputs are dropped, so every layer sees fresh prompts ("VPT-deep"; "VPT-shallow" is
layer 0 only). Prompts get no position embedding. The reference code prepends them before
CLS instead; without position embeddings a block is permutation-equivariant, so the
place in the sequence does not change any output.

`forward` runs timm's own blocks on the prompt-extended sequence (any block type).
`forward_branches` runs G prompt sets ("branches", e.g. VPTSP's image and semantic
branch) over the same images as one G*B pass, with the same maths and less work:
- patch + position embedding is computed once for the B images and shared;
- prompt tokens only serve as keys/values (their outputs are dropped), so only their K, V
  projections are computed, and a shared prompt's once per layer, not once per sample;
- the image tokens of all branches go through every linear layer as one G*B batch, so
  no padding is needed; attention runs per branch (no mask: the fused SDPA kernels stay
  eligible), or once over G*B when every branch has as many prompts at that layer;
- the last block computes only the tokens the pooled feature reads (CLS; CLS and the
  distillation token of a distilled DeiT), when the pooling reads only those.
That needs timm's plain `Block`/`Attention` with a Linear qkv (`fuses_branches`); the
caller (models/build.py) decides once whether to use it. Prompts sit after the image
tokens in the key sequence there: attention does not depend on the order of its keys,
so only float summation order differs. With drop-path or attention dropout on, the
random masks are drawn differently than in separate passes (same distribution).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch.utils.checkpoint import checkpoint

from vpt_dml.errors import UserError

# One layer's prompt: (n, D) shared by all samples, (B, n, D) per sample, or None.
Prompt = torch.Tensor | None


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


def checkpointed_layers(num_layers: int, setting: bool | float) -> frozenset[int]:
    """Layers recomputed in backward: True -> all, False -> none, a fraction f -> every
    ~1/f-th layer (memory falls about linearly with f, recompute time rises with it)."""
    if isinstance(setting, bool) or setting is None:
        return frozenset(range(num_layers)) if setting else frozenset()
    frac = float(setting)
    if not 0.0 <= frac <= 1.0:
        raise UserError(
            f"model.grad_checkpointing={setting} must be true, false or a fraction in [0, 1]"
        )
    count = min(num_layers, round(frac * num_layers))
    return frozenset(int(i * num_layers / count) for i in range(count)) if count else frozenset()


def _prompt_len(prompt: Prompt) -> int:
    return 0 if prompt is None else prompt.shape[-2]


def _head_tokens(vit: VisionTransformer) -> int | None:
    """How many leading tokens the pooled feature reads after the last block (None: all)."""
    if type(vit) is VisionTransformerDistilled:  # (CLS + distillation token) / 2
        return 2
    if type(vit) is VisionTransformer and vit.attn_pool is None and vit.global_pool == "token":
        return 1
    return None


def _prompt_kv(attn: Attention, norm: nn.Module, prompt: torch.Tensor, batch: int):
    """K, V (batch, H, n, hd) of prompt tokens: their queries and outputs are never used."""
    width = attn.qkv.out_features // 3
    bias = attn.qkv.bias[width:] if attn.qkv.bias is not None else None
    kv = F.linear(norm(prompt), attn.qkv.weight[width:], bias)  # (n, 2W) or (B, n, 2W)
    kv = kv.unflatten(-1, (2, attn.num_heads, attn.head_dim)).movedim(-4, -2)  # (.., 2, H, n, hd)
    k, v = kv.unbind(-4)
    k = attn.k_norm(k)
    if k.dim() == 3:  # shared prompt: computed once, broadcast to the branch's samples
        k, v = k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
    return k, v


def frozen_statistics(layer: nn.Module) -> bool:
    """A normalisation layer with running statistics whose scale does not train (linear,
    VPT, BitFit, adapters, LoRA; affine=False counts as frozen): its statistics belong to
    the frozen backbone. Under full fine-tuning its scale trains and so do they, as in timm."""
    if not isinstance(layer, nn.modules.batchnorm._NormBase) or not layer.track_running_stats:
        return False
    scale = getattr(layer, "weight", None)
    return scale is None or not scale.requires_grad


def frozen_norm_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if frozen_statistics(m)]


def _keep_frozen_statistics(layer: nn.Module, args) -> None:
    # forward pre-hook: Lightning sets `training` flags directly (and modules start in
    # train mode), bypassing train(); a frozen layer must normalise with its statistics
    if layer.training and frozen_statistics(layer):
        layer.training = False


class PromptedViT(nn.Module):
    """Runs a timm ViT with per-layer prompts; returns the pooled pre-logits feature."""

    def __init__(self, vit: VisionTransformer, prompt_counts: Sequence[int] = ()) -> None:
        super().__init__()
        self.vit = vit
        self.num_layers = len(vit.blocks)
        self.dim = vit.embed_dim
        counts = list(prompt_counts) + [0] * (self.num_layers - len(prompt_counts))
        self.prompts = PromptTokens(counts[: self.num_layers], self.dim)
        self._checkpointed: frozenset[int] = frozenset()
        for layer in vit.modules():  # BatchNorm of hybrid ViTs' CNN stems
            if isinstance(layer, nn.modules.batchnorm._NormBase):
                layer.register_forward_pre_hook(_keep_frozen_statistics)

    def train(self, mode: bool = True) -> PromptedViT:
        """Train mode, except for frozen normalisation layers with running statistics
        (BatchNorm in hybrid ViTs' CNN stems, `frozen_statistics`): they stay in eval mode
        and normalise with the pretrained statistics (a pre-hook keeps that too when a
        trainer sets the flags directly)."""
        super().train(mode)
        if mode:
            for layer in frozen_norm_layers(self.vit):
                layer.eval()
        return self

    def set_grad_checkpointing(self, setting: bool | float = True) -> None:
        """Recompute activations in backward: True (every layer), False, or a fraction."""
        self._checkpointed = checkpointed_layers(self.num_layers, setting)

    @property
    def checkpointed(self) -> frozenset[int]:
        return self._checkpointed

    @property
    def fuses_branches(self) -> bool:
        """Whether `forward_branches` can run: timm's plain blocks with a Linear qkv (a LoRA
        wrapper would be bypassed by the K/V-only prompt projection). Adapters that replace
        `blk.mlp` are fine: the block calls it."""
        return all(
            type(b) is Block and type(b.attn) is Attention and type(b.attn.qkv) is nn.Linear
            for b in self.vit.blocks
        )

    def compile_blocks(self) -> None:
        """torch.compile each block in place (state-dict keys unchanged) and the K/V-only
        block of `forward_branches`, which calls the blocks' parts, not the blocks."""
        for block in self.vit.blocks:
            block.compile()
        # an instance attribute over the static method: a deep copy shares no bound state
        self._branch_block = torch.compile(PromptedViT._branch_block)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def _layers(self, x: torch.Tensor, block, prompts: Sequence, last_keep: int | None):
        """x through every block as `block(blk, x, prompts[l], keep)`; the one place that
        applies gradient checkpointing."""
        ckpt = self._checkpointed if self.training and torch.is_grad_enabled() else ()
        for layer, blk in enumerate(self.vit.blocks):
            keep = last_keep if layer == self.num_layers - 1 else None
            if layer in ckpt:
                x = checkpoint(block, blk, x, prompts[layer], keep, use_reentrant=False)
            else:
                x = block(blk, x, prompts[layer], keep)
        return x

    def _prompted_block(
        self, blk: nn.Module, x: torch.Tensor, prompt: Prompt, _keep: None
    ) -> torch.Tensor:
        """timm's block on [prefix, prompt, patches]; the prompt outputs are dropped."""
        if _prompt_len(prompt) == 0:
            return blk(x)
        p = self.vit.num_prefix_tokens
        if prompt.dim() == 2:
            prompt = prompt.expand(x.shape[0], -1, -1)
        n = prompt.shape[1]
        x = torch.cat([x[:, :p], prompt.to(x.dtype), x[:, p:]], dim=1)
        x = blk(x)
        return torch.cat([x[:, :p], x[:, p + n :]], dim=1)

    def forward(
        self, images: torch.Tensor, prompts: Sequence[Prompt] | None = None
    ) -> torch.Tensor:
        """`prompts[l]` is (n_l, D) shared or (B, n_l, D) per sample; None uses P."""
        if prompts is None:
            prompts = self.prompts.per_layer()
        per_layer = [prompts[i] if i < len(prompts) else None for i in range(self.num_layers)]
        x = self._layers(self.embed(images), self._prompted_block, per_layer, None)
        return self.vit.forward_head(self.vit.norm(x), pre_logits=True)

    def forward_branches(
        self, images: torch.Tensor, branches: Sequence[Sequence[Prompt]]
    ) -> list[torch.Tensor]:
        """Pooled features of `images` under each branch's per-layer prompts, in one pass.

        branches[g][l] is branch g's prompt at layer l. Returns one (B, D) tensor per branch,
        equal to `[self(images, b) for b in branches]` (see the module docstring).
        """
        if not self.fuses_branches:
            raise ValueError(
                "forward_branches needs timm's plain Block/Attention with a Linear qkv; "
                "run one forward per branch instead"
            )
        n_branch = len(branches)
        x = self.embed(images)  # shared by every branch
        x = x.repeat(n_branch, 1, 1) if n_branch > 1 else x
        per_layer = [
            [b[i] if i < len(b) and _prompt_len(b[i]) > 0 else None for b in branches]
            for i in range(self.num_layers)
        ]
        x = self._layers(x, self._branch_block, per_layer, _head_tokens(self.vit))
        feats = self.vit.forward_head(self.vit.norm(x), pre_logits=True)
        return list(feats.chunk(n_branch)) if n_branch > 1 else [feats]

    @staticmethod
    def _branch_block(
        blk: Block, x: torch.Tensor, prompts: Sequence[Prompt], keep: int | None
    ) -> torch.Tensor:
        """timm's `Block.forward` on x (G*B, T, D), branch g's prompts joining only its keys
        and values; with `keep`, only the first `keep` tokens' outputs are computed."""
        attn = blk.attn
        batch = x.shape[0] // len(prompts)
        h = blk.norm1(x)
        hq = h if keep is None else h[:, :keep]
        x = x if keep is None else x[:, :keep]
        # q and (k, v) from two slices of the qkv weight: attention then keeps q and the
        # prompt-extended k, v for backward, not also the whole qkv output
        width = attn.qkv.out_features // 3
        weight, bias = attn.qkv.weight, attn.qkv.bias
        q = F.linear(hq, weight[:width], bias[:width] if bias is not None else None)
        kv = F.linear(h, weight[width:], bias[width:] if bias is not None else None)
        q = attn.q_norm(q.unflatten(-1, (attn.num_heads, attn.head_dim)).transpose(1, 2))
        k, v = kv.unflatten(-1, (2, attn.num_heads, attn.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        k = attn.k_norm(k)  # q, k, v: (G*B, H, T, hd)
        drop = attn.attn_drop.p if attn.training else 0.0
        lengths = {_prompt_len(p) for p in prompts}
        if lengths == {0}:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        else:
            kvs = [
                _prompt_kv(attn, blk.norm1, p, batch) if p is not None else None for p in prompts
            ]
            if len(lengths) == 1:  # same prompt length in every branch: one call over G*B
                k = torch.cat([k, torch.cat([kv[0] for kv in kvs])], dim=2)
                v = torch.cat([v, torch.cat([kv[1] for kv in kvs])], dim=2)
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
            else:
                outs = []
                for g, kv in enumerate(kvs):
                    rows = slice(g * batch, (g + 1) * batch)
                    kg, vg = k[rows], v[rows]
                    if kv is not None:
                        kg, vg = torch.cat([kg, kv[0]], dim=2), torch.cat([vg, kv[1]], dim=2)
                    outs.append(F.scaled_dot_product_attention(q[rows], kg, vg, dropout_p=drop))
                out = torch.cat(outs)
        out = attn.norm(out.transpose(1, 2).flatten(2))
        if getattr(attn, "gate", None) is not None:  # timm's gated attention output
            out = out * attn.gate(hq).sigmoid()
        out = attn.proj_drop(attn.proj(out))
        x = x + blk.drop_path1(blk.ls1(out))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
