"""The evaluation's de-duplication and the best-epoch choice, on inputs where a wrong
choice gives another answer (issue 19: mutants that every earlier test let pass)."""

from __future__ import annotations

import torch

from vpt_dml.evaluation.epoch import gather_embeddings, unique_first
from vpt_dml.runs.callbacks.metric_history import MetricHistory


def test_unique_first_keeps_the_first_of_each_repeated_index():
    index = torch.tensor([3, 1, 3, 0, 1, 2, 3])
    values, first = unique_first(index)
    assert values.tolist() == [0, 1, 2, 3]
    assert first.tolist() == [3, 1, 5, 0]  # not the last (6, 4) of the repeats


def test_gather_embeddings_drops_padding_by_index_keeping_the_first_row():
    """Repeated dataset indices carrying different embeddings and labels: the rows kept
    are the first of each index, one per index, sorted by index."""
    # two batches as one rank buffers them; rows are numbered so each is recognisable
    index = torch.tensor([4, 0, 2, 0, 4, 1, 3, 2])
    emb = torch.arange(8, dtype=torch.float32)[:, None].repeat(1, 3)
    labels = torch.arange(10, 18)
    buffer = [(emb[:5], labels[:5], index[:5]), (emb[5:], labels[5:], index[5:])]
    got_emb, got_labels, got_index = gather_embeddings(buffer, None, world_size=1)
    assert got_index.tolist() == [0, 1, 2, 3, 4]
    rows = [1, 5, 2, 6, 0]  # first occurrence of 0, 1, 2, 3, 4
    assert torch.equal(got_emb, emb[rows])
    assert torch.equal(got_labels, labels[rows])


def history(recalls: list[float], stage: str = "val") -> MetricHistory:
    h = MetricHistory()
    for epoch, r in enumerate(recalls):
        h._add(stage, epoch, {"recall@1": r, "map@r": 1.0 - r})
    return h


def test_best_is_the_first_epoch_with_the_highest_recall_at_1():
    h = history([0.5, 0.7, 0.7, 0.6])
    best = h.best()
    assert best["epoch"] == 1 and best["metrics"]["recall@1"] == 0.7
    # another key ranks the epochs the other way round
    assert h.best(key="map@r")["epoch"] == 0
    assert history([0.2, 0.1, 0.3, 0.3], stage="test").best("test")["epoch"] == 2
    assert h.best("test") is None
