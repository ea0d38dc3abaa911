"""Exact retrieval metrics: Recall@K, MAP@R, R-precision (cosine, query left out).

Reference implementation: exact cosine k-NN in chunks (float32 similarities), ties
broken by the lower gallery index. `vpt_dml.evaluation.knn` holds the fast search.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _knn(queries: torch.Tensor, gallery: torch.Tensor, k: int, exclude_self: bool, chunk: int = 1024) -> torch.Tensor:
    """Indices of the k most similar gallery items per query; ties -> lower index."""
    out = []
    for start in range(0, len(queries), chunk):
        sim = queries[start : start + chunk] @ gallery.T
        if exclude_self:
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, rows + start] = -float("inf")
        # stable descending sort keeps the lower index first among equal similarities
        order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]
        out.append(order)
    return torch.cat(out)


def retrieval_metrics(
    embeddings: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    ks: tuple[int, ...] = (1, 2, 4, 8),
    gallery_embeddings: torch.Tensor | np.ndarray | None = None,
    gallery_labels: torch.Tensor | np.ndarray | None = None,
) -> dict[str, float]:
    q = F.normalize(torch.as_tensor(embeddings).float(), dim=-1)
    ql = torch.as_tensor(labels).long()
    same = gallery_embeddings is None
    g = q if same else F.normalize(torch.as_tensor(gallery_embeddings).float(), dim=-1)
    gl = ql if same else torch.as_tensor(gallery_labels).long()

    # R per query: same-class gallery items other than the query itself.
    classes, counts = torch.unique(gl, return_counts=True)
    lookup = dict(zip(classes.tolist(), counts.tolist()))
    r = torch.tensor([lookup.get(c, 0) for c in ql.tolist()]) - (1 if same else 0)
    max_k = min(max(max(ks), int(r.max()) + 1), len(g) - (1 if same else 0))
    nn_idx = _knn(q, g, max_k, exclude_self=same)
    hits = gl[nn_idx] == ql[:, None]  # (Q, max_k)

    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = float(hits[:, :k].any(dim=1).float().mean())
    valid = r > 0
    ranks = torch.arange(1, max_k + 1)
    in_r = ranks[None, :] <= r[:, None]
    prec = torch.cumsum(hits.float(), 1) / ranks
    r_f = r.clamp(min=1).float()
    out["map@r"] = float(((prec * hits * in_r).sum(1) / r_f)[valid].mean())
    out["r_precision"] = float(((hits * in_r).sum(1) / r_f)[valid].mean())
    # VPTSP reference variant: R counts the query too, AP over the top R (lower numbers).
    r_v = r + (1 if same else 0)
    in_rv = ranks[None, :] <= r_v[:, None]
    out["map@r_vptsp"] = float(((prec * hits * in_rv).sum(1) / r_v.clamp(min=1).float())[valid].mean())
    return out
