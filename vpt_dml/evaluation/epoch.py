"""One evaluation epoch's metrics from the embeddings every rank collected.

Under DDP each rank embeds its shard of the evaluation set (the sampler pads the shards
to equal length by repeating items). Here all ranks' (embedding, label, dataset index)
are gathered, the padding is removed by dataset index, and the metrics are computed on
the full set: every rank computes the same numbers, so they are logged without a sync.
k-means (NMI/F1) runs on rank 0 only and is broadcast, since multi-threaded k-means need
not give identical clusters on every rank.
Embedding health and non-finite embeddings: evaluation/health.py.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from vpt_dml.evaluation.clustering import clustering_metrics
from vpt_dml.evaluation.health import embedding_health, non_finite_embeddings
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
