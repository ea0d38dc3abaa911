"""Exact ties rank by one rule: equal similarity, then the lower gallery index first.

References here take their similarities from the distinct prototype vectors and copy
them to every duplicate, so duplicates tie exactly by construction; a stable sort in
gallery order then applies the rule.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_retrieval import metrics_from_similarity

from vpt_dml.evaluation import retrieval_metrics
from vpt_dml.evaluation.knn import exact_dot, rank_positives, unit_rows
from vpt_dml.evaluation.retrieval import metrics_from_ranks

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KS = (1, 2, 4, 8, 16)


def shuffled_pairs(n, seed):
    """n labels, n / 2 classes of 2, in random order."""
    gen = torch.Generator().manual_seed(seed)
    return torch.arange(n // 2).repeat_interleave(2)[torch.randperm(n, generator=gen)]


def lower_index_recall_at_1(labels):
    """N identical vectors: every query's first neighbour is item 0 (item 1 for item 0)."""
    first = torch.zeros_like(labels)
    first[0] = 1
    return float((labels[first] == labels).double().mean())


def reference(proto, q_of, ql, g_of=None, gl=None, ks=KS):
    """Float64 stable-sort metrics with item i = proto[q_of[i]] (gallery: proto[g_of])."""
    p = np.asarray(proto, np.float64)
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    sim = (p @ p.T)[np.asarray(q_of)[:, None], np.asarray(q_of if g_of is None else g_of)[None]]
    return metrics_from_similarity(sim, ql, gl, ks)


def assert_equal_metrics(want, got, tol=1e-12):
    assert want.keys() <= got.keys()
    bad = {k: (want[k], got[k]) for k in want if abs(want[k] - got[k]) > tol}
    assert not bad, bad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(20))
def test_identical_vectors_rank_by_lower_index(seed, device):
    """100 identical vectors in 50 shuffled classes of 2: Recall@1 is what the rule
    gives ((1 + [y_0 == y_1]) / 100), every metric the index-order reference's."""
    gen = torch.Generator().manual_seed(seed)
    labels = shuffled_pairs(100, seed)
    x = torch.randn(1, 64, generator=gen).repeat(100, 1)  # not exactly representable
    got = retrieval_metrics(x.to(device), labels.to(device), ks=KS)
    assert got["recall@1"] == lower_index_recall_at_1(labels)
    assert_equal_metrics(reference(x[:1], torch.zeros(100, dtype=torch.long), labels), got)


def test_identical_vectors_in_class_order_give_two_percent():
    """The issue's case: 50 classes of 2 stored class by class -> items 0 and 1 hit."""
    labels = torch.arange(50).repeat_interleave(2)
    got = retrieval_metrics(torch.ones(100, 512) / 3, labels, ks=(1,))
    assert got["recall@1"] == 0.02


def duplicates(n_proto, n, dim, kind, seed):
    """n items drawn from n_proto prototypes, labels independent of the prototype (so
    exact duplicates sit in different classes). kind "gauss": random directions;
    "quarter": entries in {0, +-1/2} (norm 1; every similarity is a multiple of 1/4, so
    distinct prototypes tie too)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        proto = torch.randn(n_proto, dim, generator=gen, dtype=torch.float64)
    else:
        proto = torch.zeros(n_proto, dim, dtype=torch.float64)
        for i in range(n_proto):
            support = torch.randperm(dim, generator=gen)[:4]
            sign = 2 * torch.randint(2, (4,), generator=gen) - 1
            proto[i, support] = 0.5 * sign.double()
    of = torch.randint(n_proto, (n,), generator=gen)
    labels = torch.randint(max(2, n // 6), (n,), generator=gen)
    return proto, of, labels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gauss", "quarter"])
@pytest.mark.parametrize("candidate", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_duplicate_heavy_equals_stable_sort(seed, candidate, kind, device):
    """Few distinct vectors, many duplicates across classes, over several blocks of two
    tiles (the upper-triangle path serves rows and columns): every metric equals the
    reference, inline and with worker threads."""
    proto, of, labels = duplicates(7, 300, 16, kind, seed)
    x = proto[of].float().to(device)
    r = rank_positives(
        x, labels.to(device), candidate=candidate, block=128, tile=64, workers=1 + seed % 2
    )
    got = metrics_from_ranks(r.num_positives, r.negatives_above, KS, True)
    assert_equal_metrics(reference(proto, of, labels), got)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gauss", "quarter"])
@pytest.mark.parametrize("seed", [0, 1])
def test_duplicate_heavy_gallery_equals_stable_sort(seed, kind, device):
    """Gallery mode, queries duplicated in the gallery across classes, several blocks."""
    proto, of, labels = duplicates(6, 330, 12, kind, seed)
    qo, ql, go, gl = of[:130], labels[:130], of[130:], labels[130:]
    x = proto[of].float().to(device)
    r = rank_positives(x[:130], ql.to(device), x[130:], gl.to(device), block=64)
    got = metrics_from_ranks(r.num_positives, r.negatives_above, KS, False)
    assert_equal_metrics(reference(proto, qo, ql, go, gl), got)


@pytest.mark.parametrize("device", DEVICES)
def test_collapsed_model_scores_chance(device):
    """400 equal embeddings in 100 shuffled classes of 4 (a model that maps every image
    to one point): the rule's index order, i.e. chance, not 100%."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(100).repeat_interleave(4)[torch.randperm(400, generator=gen)]
    x = torch.randn(1, 384, generator=gen).expand(400, -1)
    got = retrieval_metrics(x.to(device), labels.to(device), ks=(1, 2, 4, 8))
    want = reference(x[:1], torch.zeros(400, dtype=torch.long), labels, ks=(1, 2, 4, 8))
    assert_equal_metrics(want, got)
    chance = 3 / 399  # other items of the query's class / other items
    assert got["recall@1"] <= 2 * chance and got["map@r"] <= 2 * chance
    # nearly collapsed (float32 noise, as a real network's batches give): still chance
    noisy = x + 1e-6 * torch.randn(400, 384, generator=gen)
    got = retrieval_metrics(noisy.to(device), labels.to(device), ks=(1,))
    assert got["recall@1"] < 0.05 and got["map@r"] < 0.05


@pytest.mark.parametrize("device", DEVICES)
def test_exact_dot_depends_on_the_pair_only(device):
    """Bit-identical value for one pair whatever the batch size, position, or argument
    order; equal rows stay equal after normalisation."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(1000, 300, generator=gen, dtype=torch.float64).to(device)
    b = torch.randn(1000, 300, generator=gen, dtype=torch.float64).to(device)
    full = exact_dot(a, b)
    for i in (0, 1, 511, 999):
        assert exact_dot(a[i : i + 1], b[i : i + 1])[0] == full[i]
        assert exact_dot(b[i], a[i]) == full[i]
    assert (exact_dot(a[:7], b[:7]) == full[:7]).all()
    assert torch.allclose(full, (a * b).sum(1), rtol=0, atol=1e-12)  # float64
    u = unit_rows(torch.cat([a[:5], a[2:3].repeat(300, 1)]))
    assert (u[5:] == u[2]).all()
