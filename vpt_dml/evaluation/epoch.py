"""One evaluation epoch's metrics from the embeddings every rank collected.

Under DDP each rank embeds its shard of the evaluation set (the sampler pads the shards
to equal length by repeating items). Here all ranks' (embedding, label, dataset index)
are gathered, the padding is removed by dataset index, and the metrics are computed on
the full set: every rank computes the same numbers, so they are logged without a sync.
k-means (NMI/F1) runs on rank 0 only and is broadcast, since multi-threaded k-means need
not give identical clusters on every rank.

Embedding health (`embedding_health`): a collapsed model (every image on one point, e.g.
after `optim.lr=1e6`) still gets retrieval numbers (ties ranked by index), and they look
like chance or better. Each evaluation therefore also counts, on the L2-normalised
embeddings the cosine ranking sees:
- `distinct`: distinct rows, unit rows compared at DISTINCT_DECIMALS decimals (rows equal
  up to float rounding, e.g. one direction at several lengths, are ties for the ranking);
- `effective_rank`: exp of the entropy of the normalised singular values of the centred
  embeddings (Roy & Vetterli 2007): ~D for a spread over D directions, 1 for one
  direction, 0 when the rows' RMS distance to their mean is below SPREAD_TOL (one point,
  up to float rounding).
`collapsed` says when the metrics mean nothing (results.py turns it into a warning).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vpt_dml.callbacks.divergence import non_finite_embeddings
from vpt_dml.evaluation.clustering import clustering_metrics
from vpt_dml.evaluation.per_query import table as per_query_table
from vpt_dml.evaluation.retrieval import retrieval_metrics

log = logging.getLogger("vpt_dml")

# (embeddings, labels, dataset index) of one evaluation batch
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def unique_first(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique values and the position of each one's first occurrence."""
    order = torch.argsort(index, stable=True)
    sorted_idx = index[order]
    keep = torch.ones_like(sorted_idx, dtype=torch.bool)
    keep[1:] = sorted_idx[1:] != sorted_idx[:-1]
    return sorted_idx[keep], order[keep]


def gather_embeddings(buffer: Sequence[Batch], strategy, world_size: int) -> Batch:
    """All ranks' (embeddings, labels, index), padding removed, sorted by index."""
    emb = torch.cat([b[0] for b in buffer])
    labels = torch.cat([b[1] for b in buffer])
    index = torch.cat([b[2] for b in buffer])
    if world_size > 1:
        emb, labels, index = (strategy.all_gather(t).flatten(0, 1) for t in (emb, labels, index))
    index, first = unique_first(index)
    return emb[first], labels[first], index


# far above float32 rounding of a unit vector (~1e-7), far below a meaningful difference
DISTINCT_DECIMALS = 5
# RMS distance of unit rows to their mean below this: one point (float32 rounding is ~1e-7)
SPREAD_TOL = 1e-4
# collapsed: fewer distinct rows than this fraction, or spread along less than ~1.5 directions
MIN_DISTINCT_FRACTION = 0.5
MIN_EFFECTIVE_RANK = 1.5


def embedding_health(emb: torch.Tensor) -> dict:
    """{"rows", "dim", "distinct", "effective_rank"} of one evaluation's embeddings."""
    x = F.normalize(emb.float(), dim=1)
    rows, dim = x.shape
    scale = 10.0**DISTINCT_DECIMALS
    distinct = len(torch.unique(torch.round(x * scale), dim=0)) if rows else 0
    centred = x - x.mean(0, keepdim=True)
    # singular values from the D x D Gram matrix: cheap for N >> D (SOP: 60k x 512)
    gram = (centred.T @ centred).double()
    sv = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    spread = math.sqrt(float(gram.diagonal().sum()) / max(rows, 1))
    if spread < SPREAD_TOL or float(sv.sum()) == 0.0:
        rank = 0.0
    else:
        p = sv / sv.sum()
        p = p[p > 0]
        rank = float(torch.exp(-(p * p.log()).sum()))
    return {"rows": rows, "dim": dim, "distinct": distinct, "effective_rank": round(rank, 3)}


def collapsed(health: dict) -> str | None:
    """Why the embeddings cannot be ranked meaningfully, or None when they can."""
    rows, distinct, rank = health["rows"], health["distinct"], health["effective_rank"]
    if rows and distinct < MIN_DISTINCT_FRACTION * rows:
        return f"{distinct} distinct embedding(s) among {rows} images"
    if rows > 1 and rank < MIN_EFFECTIVE_RANK:
        return f"effective rank {rank:.2f} of {health['dim']} dimensions"
    return None


def clustering_on_rank0(emb: torch.Tensor, labels: torch.Tensor, trainer) -> dict[str, float]:
    """NMI / F1 on all evaluated items, computed on rank 0 and broadcast."""
    classes = len(torch.unique(labels))
    if classes < 2 or len(labels) <= classes:
        log.warning("NMI/F1 skipped: k-means needs >= 2 classes and more items than classes")
        return {}
    result = None
    if trainer.is_global_zero:
        # on GPU: torch k-means on the device; on CPU: faiss k-means when installed
        result = clustering_metrics(emb, labels, seed=0)
    if trainer.world_size > 1:
        result = trainer.strategy.broadcast(result, src=0)
    return result


def epoch_metrics(
    buffer: Sequence[Batch],
    trainer,
    stage: str,
    ks: Sequence[int],
    clustering: bool,
    health: dict | None = None,
    per_query: list | None = None,
) -> dict[str, float]:
    """Retrieval metrics (+ NMI/F1 when `clustering`) of stage "val" or "test";
    `health`, when given, is filled with `embedding_health` of the evaluated rows;
    `per_query`, a list, receives the per-query table of the same ranks (per_query.py)."""
    emb, labels, index = gather_embeddings(buffer, trainer.strategy, trainer.world_size)
    non_finite_embeddings(emb, trainer, stage)  # raises Diverged: the weights hold NaN/inf
    loader = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
    dataset = loader.dataset
    # metrics run where the embeddings are (GPU, or CPU: bf16 candidates only with native units)
    labels, index = labels.to(emb.device), index.to(emb.device)
    # images skipped as undecodable (data.skip_broken=true) carry label -1: left out
    kept = labels >= 0
    emb, labels, index = emb[kept], labels[kept], index[kept]
    if health is not None:
        health.update(embedding_health(emb))
    ranks: list | None = None if per_query is None else []
    if dataset.has_gallery:
        q = dataset.query_mask.to(emb.device)[index]
        g = dataset.gallery_mask.to(emb.device)[index]
        metrics = retrieval_metrics(emb[q], labels[q], tuple(ks), emb[g], labels[g], ranks)
    else:
        q = torch.ones_like(labels, dtype=torch.bool)
        metrics = retrieval_metrics(emb, labels, tuple(ks), keep_ranks=ranks)
    if ranks:
        per_query.append(per_query_table(*ranks[0], index[q], labels[q]))
    if clustering:
        metrics.update(clustering_on_rank0(emb, labels, trainer))
    return metrics
