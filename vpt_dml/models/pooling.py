"""What the pooled feature reads, per pooling, and what the prompts do to it.

The suite pools as the backbone defines it: timm's own `forward_head(norm(x),
pre_logits=True)` on the tokens after the last block. Prompt outputs are dropped after
every block (METHOD.md §1), so the last block's output has exactly timm's layout
[prefix tokens, patch tokens] and the pool reads the same tokens as without prompts;
prompts act only as extra keys/values inside every prompted block's attention:
- token (ViT in21k, CLIP, DINOv2; DINOv3 with global_pool=token, as upstream DINOv3): the
  class token, as the reference reads it (f(x) = Head(LN(ViT_P(x))[CLS])).
- avg (EVA-02, timm's DINOv3 default): the mean over patch tokens (prefix tokens, and so
  prompts too, excluded), then fc_norm where the model has it.
- map (SigLIP, Perception Encoder): timm's attention pool, a learned latent query over
  all final tokens (prefix + patches); prompts are not among its keys.
- avgmax / max: as avg.
A distilled DeiT reads (CLS + distillation token) / 2.
"""

from __future__ import annotations

import torch.nn as nn

READS = {
    "token": "the class token",
    "avg": "the mean of the patch tokens",
    "avgmax": "the mean and max of the patch tokens",
    "max": "the max of the patch tokens",
    "map": "an attention pool (learned query) over prefix and patch tokens",
    "": "all tokens (no pooling)",
}
PROMPTS = "prompt outputs dropped after every block: never read by the pool, keys/values only"


def pooling_of(vit: nn.Module) -> dict:
    """{"pool", "reads", "prompts"} of a timm ViT or Eva, for metrics.json and the README."""
    pool = "map" if getattr(vit, "attn_pool", None) is not None else vit.global_pool
    reads = READS.get(pool, pool)
    if type(vit).__name__ == "VisionTransformerDistilled":
        pool, reads = "token+dist", "(class token + distillation token) / 2"
    return {"pool": pool, "reads": reads, "prompts": PROMPTS}
