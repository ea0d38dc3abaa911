"""The suite's Recall@K and R-precision against torchmetrics, an independent implementation.

torchmetrics' `RetrievalHitRate(top_k=K)` is Recall@K as DML defines it (a hit when any
same-class item is in the top K) and `RetrievalRPrecision` is R-precision with R = the
query's positives. Each query is one torchmetrics group whose candidates are every other
item (the query itself excluded, as the suite does) or the gallery; a query without
positives (a singleton class) is skipped (`empty_target_action="skip"`), as the suite
leaves it out. torchmetrics sorts float32 scores without a tie rule, so the data here is
checked tie-free (no positive within TIE_GAP of a negative) before comparing.

Not compared: torchmetrics' RetrievalRecall / RetrievalMAP / RetrievalMRR, which count a
positive scored <= 0 as irrelevant (cosine similarities are often negative) and whose AP
divides by the positives retrieved, not by R: they are not DML's definitions.
"""

from __future__ import annotations

import pytest
import torch
from torchmetrics.retrieval import RetrievalHitRate, RetrievalRPrecision

from vpt_dml.evaluation.retrieval import retrieval_metrics

KS = (1, 2, 3, 4, 8, 16)
TIE_GAP = 2.5e-7  # > 2 float32 ulps of a cosine (<= 6e-8 each): float32 keeps the float64 order
AGREE = 1e-6


def _data(seed: int, n: int, classes: int, dim: int, singletons: int):
    """Clustered embeddings (classes overlap, so recalls sit between 0 and 1) plus a few
    singleton classes, in a shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=gen)
    emb = centres[labels] + 1.2 * torch.randn(n, dim, generator=gen, dtype=torch.float64)
    lone = torch.arange(classes, classes + singletons)
    emb = torch.cat([emb, torch.randn(singletons, dim, generator=gen, dtype=torch.float64)])
    labels = torch.cat([labels, lone])
    order = torch.randperm(len(labels), generator=gen)
    return emb[order], labels[order]


def _cosine(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    q = q / q.norm(dim=1, keepdim=True)
    g = g / g.norm(dim=1, keepdim=True)
    return q @ g.T


def _groups(sim: torch.Tensor, same_class: torch.Tensor, exclude_self: bool):
    """Flat (preds, target, indexes) with one group per query; tie-freeness asserted."""
    n_q, n_g = sim.shape
    keep = torch.ones(n_q, n_g, dtype=torch.bool)
    if exclude_self:
        keep.fill_diagonal_(False)
    preds32 = sim.float()
    for i in range(n_q):  # no positive may tie a negative (the order among either is moot)
        pos, neg = preds32[i][keep[i] & same_class[i]], preds32[i][keep[i] & ~same_class[i]]
        if len(pos) and len(neg):
            gap = (pos[:, None] - neg[None, :]).abs().min()
            assert float(gap) > TIE_GAP, "test data has (near-)ties: reseed"
    indexes = torch.arange(n_q)[:, None].expand(n_q, n_g)
    return preds32[keep], same_class[keep], indexes[keep]


def torchmetrics_reference(q, ql, g=None, gl=None) -> dict[str, float]:
    exclude_self = g is None
    g, gl = (q, ql) if g is None else (g, gl)
    preds, target, indexes = _groups(_cosine(q, g), ql[:, None] == gl[None, :], exclude_self)
    out = {}
    for k in KS:
        hit = RetrievalHitRate(top_k=k, empty_target_action="skip")
        out[f"recall@{k}"] = float(hit(preds, target, indexes=indexes))
    rp = RetrievalRPrecision(empty_target_action="skip")
    out["r_precision"] = float(rp(preds, target, indexes=indexes))
    return out


def _compare(ours: dict, theirs: dict) -> None:
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=AGREE), key


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_self_retrieval_matches_torchmetrics(seed):
    emb, labels = _data(seed, n=150, classes=20, dim=6, singletons=3)
    theirs = torchmetrics_reference(emb, labels)
    ours = retrieval_metrics(emb, labels, ks=KS)
    _compare(ours, theirs)
    # a meaningful check: neither trivially perfect nor zero
    assert 0.05 < theirs["recall@1"] < 0.95 and theirs["recall@16"] > theirs["recall@1"]


def test_query_gallery_retrieval_matches_torchmetrics():
    """In-Shop style: queries ranked against the gallery only (no self to exclude); a
    query class absent from the gallery is skipped by both."""
    emb, labels = _data(3, n=200, classes=25, dim=6, singletons=0)
    q, ql, g, gl = emb[:80], labels[:80], emb[80:], labels[80:]
    ql = torch.cat([ql, torch.tensor([999])])  # no positive in the gallery
    q = torch.cat([q, torch.randn(1, q.shape[1], dtype=q.dtype)])
    theirs = torchmetrics_reference(q, ql, g, gl)
    ours = retrieval_metrics(q, ql, ks=KS, gallery_embeddings=g, gallery_labels=gl)
    _compare(ours, theirs)


def test_float32_embeddings_match_torchmetrics():
    """The evaluation buffer holds float32 embeddings: same numbers."""
    emb, labels = _data(4, n=120, classes=15, dim=8, singletons=2)
    emb = emb.float()
    theirs = torchmetrics_reference(emb.double(), labels)
    _compare(retrieval_metrics(emb, labels, ks=KS), theirs)


def test_torchmetrics_recall_is_not_dml_recall():
    """Why the oracle uses HitRate: torchmetrics' RetrievalRecall drops positives scored
    <= 0, so on a query whose only positive has a negative cosine it reports 0 even
    when that positive is ranked first (DML's Recall@1: 1)."""
    from torchmetrics.retrieval import RetrievalRecall

    preds = torch.tensor([-0.1, -0.5, -0.9])  # the positive ranks first, with cosine -0.1
    target = torch.tensor([True, False, False])
    indexes = torch.zeros(3, dtype=torch.long)
    assert float(RetrievalRecall(top_k=1)(preds, target, indexes=indexes)) == 0.0
    assert float(RetrievalHitRate(top_k=1)(preds, target, indexes=indexes)) == 1.0
