"""Per-query files: one row per counted query, from the ranks the metrics use; their means
are metrics.json's numbers to the last bit (self-retrieval and In-Shop query/gallery)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vpt_dml.evaluation import per_query
from vpt_dml.evaluation.retrieval import retrieval_metrics

KS = (1, 2, 4, 8)


def awkward_embeddings(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Poorly separated embeddings with exact duplicates (ties) and a singleton class."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, 6, generator=g)
    emb[5] = emb[3]  # an exact tie
    labels = torch.randint(0, 7, (n,), generator=g)
    labels[-1] = 99  # a lone query: counted in no metric
    return emb, labels


@pytest.mark.parametrize("gallery", [False, True], ids=["self-retrieval", "query-gallery"])
def test_means_of_the_table_are_the_metrics_bit_for_bit(gallery: bool) -> None:
    emb, labels = awkward_embeddings(97, seed=4)
    kwargs = {}
    if gallery:
        g_emb, g_labels = awkward_embeddings(131, seed=5)
        g_labels[-1] = 98  # the query class 99 has no gallery image
        kwargs = {"gallery_embeddings": g_emb, "gallery_labels": g_labels}
    ranks: list = []
    metrics = retrieval_metrics(emb, labels, KS, keep_ranks=ranks, **kwargs)
    tbl = per_query.table(*ranks[0], torch.arange(len(labels)), labels)
    assert tbl["_lone_queries"] >= 1 and 99 not in tbl["label"]
    means = per_query.means(tbl, KS)
    assert set(means) == set(metrics)
    for key, value in metrics.items():
        assert means[key] == value, key  # exact, not approx


def test_worst_gallery_picks_the_deepest_first_positives() -> None:
    from vpt_dml.errors import UserError
    from vpt_dml.runs.callbacks.dashboard import Dashboard, worst_queries

    cols = {"index": np.array([10, 11, 12, 13, 14]), "first_positive_rank": np.array([1, 7, 3, 7, 2]),
            "ap_at_r": np.array([1.0, 0.2, 0.4, 0.1, 0.5])}  # fmt: skip
    # rank 7 twice: the lower AP first; then rank 3
    assert worst_queries(cols, 3).tolist() == [13, 11, 12]
    with pytest.raises(UserError, match="gallery"):
        Dashboard(gallery="worse")
