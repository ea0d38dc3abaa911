"""Proxy Anchor loss (Kim et al., CVPR 2020) with proxies supplied by the caller.

L = 1/Z+ * sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x,p) - delta)))
  + 1/|P| * sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x,p) + delta)))

positive_normalization: "present" -> Z+ = |P+| (the original paper, and
pytorch-metric-learning); "all" -> Z+ = C (the VPTSP reference code).
proxy_range: "all" -> every class's proxy; "in_batch" -> only the batch's classes (rows
torch.unique(labels) of the proxies given). With semantic proxies the reference builds
those rows from the GRU's output before H's normalisation: SemanticProxies(...,
in_batch_proxies=True) supplies them so (models/semantic_proxies.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vpt_dml.errors import UserError


def _loss_dtype(x: torch.Tensor) -> torch.dtype:
    """At least float32 (half-precision activations under AMP), float64 kept."""
    return torch.promote_types(x.dtype, torch.float32)


def _log1p_sum_exp(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per column, log(1 + sum over masked rows of exp(logits)), computed stably."""
    masked = logits.masked_fill(~mask, float("-inf"))
    zeros = torch.zeros(1, logits.shape[1], dtype=logits.dtype, device=logits.device)
    return torch.logsumexp(torch.cat([zeros, masked], dim=0), dim=0)


class ProxyAnchorLoss(nn.Module):
    def __init__(
        self,
        alpha: float = 32.0,
        delta: float = 0.1,
        positive_normalization: str = "present",
        proxy_range: str = "all",
    ) -> None:
        super().__init__()
        if positive_normalization not in ("present", "all"):
            raise UserError(
                f"loss.positive_normalization={positive_normalization!r}; use present or all"
            )
        if proxy_range not in ("all", "in_batch"):
            raise UserError(f"loss.proxy_range={proxy_range!r}; use all or in_batch")
        self.alpha = alpha
        self.delta = delta
        self.positive_normalization = positive_normalization
        self.proxy_range = proxy_range

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor
    ) -> torch.Tensor:
        emb = F.normalize(embeddings.to(_loss_dtype(embeddings)), dim=-1)
        prox = F.normalize(proxies.to(_loss_dtype(embeddings)), dim=-1)
        if self.proxy_range == "in_batch":
            classes, labels = torch.unique(labels, return_inverse=True)
            prox = prox[classes]
        cos = emb @ prox.T  # (B, C)
        pos_mask = F.one_hot(labels, prox.shape[0]).bool()
        pos_term = _log1p_sum_exp(-self.alpha * (cos - self.delta), pos_mask)
        neg_term = _log1p_sum_exp(self.alpha * (cos + self.delta), ~pos_mask)
        has_pos = pos_mask.any(dim=0)
        num_classes = prox.shape[0]
        z_pos = (
            has_pos.sum().clamp(min=1) if self.positive_normalization == "present" else num_classes
        )
        # masked_fill, not boolean indexing: no host sync in the training step
        return pos_term.masked_fill(~has_pos, 0).sum() / z_pos + neg_term.sum() / num_classes
