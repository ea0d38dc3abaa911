"""Retrieval metrics: Recall@K, MAP@R (two conventions) and R-precision.

Conventions (checked against pytorch-metric-learning's AccuracyCalculator):
- cosine similarity, exact, ties ordered by the lower gallery index (see `knn`);
- without a gallery the query set is its own gallery and a query is never its own
  neighbour; with a gallery, queries are ranked against the gallery only;
- R = number of positives (same-class gallery items, the query itself excluded);
- a query with R = 0 ("lone" query, e.g. a singleton class) is left out of every metric,
  Recall@K included, as AccuracyCalculator does for precision_at_1 / MAP@R / R-precision;
- items labelled -1 (images the dataset could not decode) are dropped first;
- `map@r_vptsp` is the VPTSP reference code's variant: R counts the query too (R + 1
  without a gallery), AP over the top R, divided by that R; it gives lower numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vpt_dml.errors import UserError
from vpt_dml.evaluation.knn import rank_positives, single_threaded

SKIPPED_LABEL = -1


def _as_tensor(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
    if name.endswith("embeddings"):
        if t.ndim != 2 or t.shape[0] == 0:
            raise UserError(f"{name} must be a non-empty (N, D) matrix, got shape {tuple(t.shape)}")
        low, high = torch.aminmax(t) if t.is_floating_point() else (t.min(), t.max())
        if not bool(torch.isfinite(low) & torch.isfinite(high)):  # NaN propagates to both
            raise UserError(
                f"{name} contain NaN or inf; check the model output (e.g. fp16 overflow)"
            )
    elif t.ndim != 1 or t.dtype.is_floating_point:
        raise UserError(f"{name} must be a 1-D integer vector, got {t.dtype} {tuple(t.shape)}")
    return t


def _checked_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or int(k) != k or k < 1 for k in ks):
        raise UserError(f"recall ks must be positive integers, got {list(ks)}; e.g. [1, 2, 4, 8]")
    return tuple(int(k) for k in ks)


def retrieval_metrics(
    embeddings: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    ks: tuple[int, ...] = (1, 2, 4, 8),
    gallery_embeddings: torch.Tensor | np.ndarray | None = None,
    gallery_labels: torch.Tensor | np.ndarray | None = None,
    keep_ranks: list | None = None,
) -> dict[str, float]:
    """`keep_ranks`: a list that receives (PositiveRanks, same) of the metrics (per_query.py)."""
    with single_threaded():  # small ops: one thread beats OpenMP's spin-waits (see knn)
        return _retrieval_metrics(
            embeddings, labels, ks, gallery_embeddings, gallery_labels, keep_ranks
        )


def _retrieval_metrics(embeddings, labels, ks, gallery_embeddings, gallery_labels, keep_ranks=None):
    ks = _checked_ks(ks)
    if (gallery_embeddings is None) != (gallery_labels is None):
        raise UserError("pass both gallery_embeddings and gallery_labels, or neither")
    q, ql = _as_tensor(embeddings, "query embeddings"), _as_tensor(labels, "query labels")
    if len(q) != len(ql):
        raise UserError(f"{len(q)} query embeddings but {len(ql)} labels; pass one label each")
    ql = ql.to(q.device)
    keep = ql != SKIPPED_LABEL
    q, ql = q[keep], ql[keep]
    same = gallery_embeddings is None
    if not same:
        g = _as_tensor(gallery_embeddings, "gallery embeddings").to(q.device)
        gl = _as_tensor(gallery_labels, "gallery labels").to(q.device)
        if len(g) != len(gl):
            raise UserError(
                f"{len(g)} gallery embeddings but {len(gl)} labels; pass one label each"
            )
        if g.shape[1] != q.shape[1]:
            raise UserError(
                f"query dim {q.shape[1]} != gallery dim {g.shape[1]}; embed both with one model"
            )
        keep = gl != SKIPPED_LABEL
        g, gl = g[keep], gl[keep]

    ranks = rank_positives(q, ql, None if same else g, None if same else gl, max_rank=max(ks))
    if keep_ranks is not None:
        keep_ranks.append((ranks, same))
    return metrics_from_ranks(ranks.num_positives, ranks.negatives_above, ks, same)


def metrics_from_ranks(
    num_positives: torch.Tensor, negatives_above: torch.Tensor, ks: tuple[int, ...], same: bool
) -> dict[str, float]:
    """Metrics from R and n_j (negatives above the j-th positive; its rank is n_j + j)."""
    valid = num_positives > 0
    if not bool(valid.any()):
        raise UserError(
            "no query has a same-class item to retrieve (every class is a singleton); "
            "evaluation needs classes with at least 2 images"
        )
    r = num_positives[valid].double()
    n = negatives_above[valid].double()
    j = torch.arange(1, n.shape[1] + 1, dtype=torch.float64, device=n.device)
    rank = n + j
    listed = j <= r[:, None]  # real positives, not padding
    out: dict[str, float] = {}
    first = rank[:, 0]
    for k in ks:
        out[f"recall@{k}"] = float((first <= k).double().mean())

    def average_precision(depth: torch.Tensor) -> torch.Tensor:
        inside = listed & (rank <= depth[:, None])
        return (torch.where(inside, j / rank, 0).sum(1) / depth).mean()

    out["map@r"] = float(average_precision(r))
    out["r_precision"] = float(((listed & (rank <= r[:, None])).sum(1) / r).mean())
    out["map@r_vptsp"] = float(average_precision(r + (1 if same else 0)))
    return out
