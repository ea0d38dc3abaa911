"""VPTSP's two branches (METHOD.md §1) through the ViT in one pass over a 2B batch.

The image branch runs x with the shared prompts P_l, the semantic branch runs the same x
with its class's prompts Q_l[c]. The maths are exactly those of two `PromptedViT` passes;
the work is less:
- patch + position embedding is computed once for the B images and shared;
- prompt tokens only serve as keys/values (their outputs are dropped), so only their K, V
  projections are computed, and a shared prompt's once per layer, not once per sample;
- the image tokens of both branches go through every linear layer as one 2B batch, so
  no padding is needed; attention runs per branch (no mask: the fused SDPA kernels stay
  eligible), or once over 2B when both branches have as many prompts at that layer;
- the last block computes only the CLS token's output, the only one the pooled
  feature reads (global_pool='token').
Prompts sit after the image tokens in the key sequence instead of after CLS: attention
is invariant to the order of its keys, so only float summation order differs.
With drop-path or attention dropout on, the random masks are drawn differently than in
two separate passes (same distribution).

`fast_features` is the same machinery for any number of branches; with one branch it is
a cheaper `PromptedViT.forward`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch.utils.checkpoint import checkpoint

from vpt_dml.models.prompted_vit import PromptedViT

# One prompt per branch at one layer: (n, D) shared by the branch, (B, n, D) per sample, or None.
Prompt = torch.Tensor | None


def supports_fast_path(vit: VisionTransformer) -> bool:
    """Plain timm ViT blocks and CLS-token pooling: what `_block` re-implements.

    qkv must be a plain Linear: prompt K, V use its weight directly (a LoRA wrapper would
    be bypassed). Adapters that replace `blk.mlp` are fine: `_block` calls it.
    """
    blocks_ok = all(
        type(b) is Block
        and type(b.attn) is Attention
        and type(b.attn.qkv) is nn.Linear
        and getattr(b.attn, "gate", None) is None
        for b in vit.blocks
    )
    pool_ok = vit.global_pool == "token" and vit.cls_token is not None and vit.attn_pool is None
    return blocks_ok and pool_ok


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


def _prompt_len(prompt: Prompt) -> int:
    return 0 if prompt is None else prompt.shape[-2]


def _block(blk: Block, x: torch.Tensor, prompts: Sequence[Prompt], cls_only: bool) -> torch.Tensor:
    """timm `Block.forward` on x (G*B, T, D), branch g's prompts joining its keys/values."""
    attn = blk.attn
    batch = x.shape[0] // len(prompts)
    h = blk.norm1(x)
    if cls_only:  # only CLS's output is read after the last block
        x = x[:, :1]
    # q and (k, v) from two slices of the qkv weight: the attention then keeps q and the
    # prompt-extended k, v for backward, not also the whole qkv output
    width = attn.qkv.out_features // 3
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(
        h[:, :1] if cls_only else h, weight[:width], bias[:width] if bias is not None else None
    )
    kv = F.linear(h, weight[width:], bias[width:] if bias is not None else None)
    q = attn.q_norm(q.unflatten(-1, (attn.num_heads, attn.head_dim)).transpose(1, 2))
    k, v = kv.unflatten(-1, (2, attn.num_heads, attn.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
    k = attn.k_norm(k)  # q, k, v: (G*B, H, T, hd)
    drop = attn.attn_drop.p if attn.training else 0.0
    lengths = {_prompt_len(p) for p in prompts}
    if lengths == {0}:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
    else:
        kvs = [_prompt_kv(attn, blk.norm1, p, batch) if p is not None else None for p in prompts]
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
    out = out.transpose(1, 2).flatten(2)
    out = attn.proj_drop(attn.proj(attn.norm(out)))
    x = x + blk.drop_path1(blk.ls1(out))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def checkpointed_layers(num_layers: int, setting: bool | float) -> set[int]:
    """Layers to recompute in backward: True -> all, a fraction f -> every ~1/f-th layer."""
    if setting is True:
        return set(range(num_layers))
    frac = float(setting)
    if frac <= 0:
        return set()
    count = min(num_layers, round(frac * num_layers))
    return {int(i * num_layers / count) for i in range(count)} if count else set()


def fast_features(
    backbone: PromptedViT, images: torch.Tensor, branches: Sequence[Sequence[Prompt]]
) -> list[torch.Tensor]:
    """Pooled features of `images` under each branch's per-layer prompts, in one pass.

    branches[g][l] is branch g's prompt at layer l. Returns one (B, D) tensor per branch.
    Checkpointing follows `backbone.grad_checkpointing` (bool, or the fraction of layers).
    """
    vit = backbone.vit
    n_branch = len(branches)
    x = backbone.embed(images)  # shared by every branch
    x = x.repeat(n_branch, 1, 1) if n_branch > 1 else x
    ckpt = set()
    if backbone.grad_checkpointing and backbone.training and torch.is_grad_enabled():
        ckpt = checkpointed_layers(backbone.num_layers, backbone.grad_checkpointing)
    last = backbone.num_layers - 1
    for layer, blk in enumerate(vit.blocks):
        prompts = [b[layer] if layer < len(b) else None for b in branches]
        prompts = [None if _prompt_len(p) == 0 else p for p in prompts]
        if layer in ckpt:
            x = checkpoint(_block, blk, x, prompts, layer == last, use_reentrant=False)
        else:
            x = _block(blk, x, prompts, layer == last)
    feats = vit.forward_head(vit.norm(x), pre_logits=True)
    return list(feats.chunk(n_branch)) if n_branch > 1 else [feats]


def two_branch_features(
    backbone: PromptedViT, images: torch.Tensor, class_prompts: Sequence[Prompt]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image-branch features with P, semantic-branch features with the given Q[c])."""
    if not supports_fast_path(backbone.vit):
        return backbone(images), backbone(images, class_prompts)
    img, sem = fast_features(backbone, images, [backbone.prompts.per_layer(), class_prompts])
    return img, sem


def two_branch_outputs(
    embedder: nn.Module, proxies: nn.Module, images: torch.Tensor, labels: torch.Tensor
):
    """(embeddings, proxies) of a VPTSP training step, as `embedder(x)` and `proxies(x, y, backbone)`."""
    feats, sem = two_branch_features(
        embedder.backbone, images, proxies.class_prompts.gather(labels)
    )
    emb = embedder.head(feats) if embedder.head is not None else F.normalize(feats, dim=-1)
    return emb, proxies.proxies_from(proxies.head(sem), labels)
