"""Retrieval metrics equal an independent float64 brute force and pytorch-metric-learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vpt_dml.errors import UserError
from vpt_dml.evaluation import retrieval_metrics
from vpt_dml.evaluation.knn import _Bounds, rank_positives


def brute_force(q, ql, g=None, gl=None, ks=(1, 2, 4, 8)):
    """Float64 full sort, ties by lower gallery index, lone queries left out."""
    same = g is None
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = q if same else np.asarray(g, np.float64) / np.linalg.norm(g, axis=1, keepdims=True)
    return metrics_from_similarity(q @ g.T, ql, None if same else gl, ks)


def metrics_from_similarity(sim, ql, gl=None, ks=(1, 2, 4, 8)):
    """Metrics of a given (Q, G) similarity matrix: stable sort (ties by lower gallery
    index), the query left out of its own list when gl is None (query set = gallery)."""
    same = gl is None
    sim = np.asarray(sim, dtype=np.float64)
    ql = np.asarray(ql)
    gl = ql if same else np.asarray(gl)
    rec = {k: [] for k in ks}
    mapr, rprec, mapv = [], [], []
    for i in range(len(sim)):
        row, idx = sim[i], np.arange(sim.shape[1])
        if same:
            row, idx = np.delete(row, i), np.delete(idx, i)
        order = idx[np.lexsort((idx, -row))]
        hits = gl[order] == ql[i]
        r = int(hits.sum())
        if r == 0:
            continue
        for k in ks:
            rec[k].append(hits[:k].any())
        prec = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        mapr.append((prec * hits)[:r].sum() / r)
        rprec.append(hits[:r].sum() / r)
        rv = r + (1 if same else 0)
        mapv.append((prec * hits)[:rv].sum() / rv)
    out = {f"recall@{k}": float(np.mean(v)) for k, v in rec.items()}
    out.update(
        {"map@r": np.mean(mapr), "r_precision": np.mean(rprec), "map@r_vptsp": np.mean(mapv)}
    )
    return out


def clustered(n_classes, sizes, dim, noise, seed):
    """Class centres plus noise, uneven class sizes (tuple of choices), normalised."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.tensor(sizes)[torch.randint(len(sizes), (n_classes,), generator=gen)]
    labels = torch.repeat_interleave(torch.arange(n_classes), counts)
    labels = labels[torch.randperm(len(labels), generator=gen)]
    centres = torch.randn(n_classes, dim, generator=gen)
    x = centres[labels] + noise * torch.randn(len(labels), dim, generator=gen)
    return torch.nn.functional.normalize(x, dim=1), labels


def tied(n, dim, seed):
    """Unit vectors with entries in {0, +-1/2}: dot products are exact multiples of 1/4,
    so many similarities tie exactly; duplicates across classes tie at 1."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, dim, dtype=torch.float64)
    for i in range(n):
        support = torch.randperm(dim, generator=gen)[:4]
        x[i, support] = 0.5 * (2 * torch.randint(2, (4,), generator=gen) - 1).double()
    x[5] = x[0]  # exact duplicates, in different classes below
    x[9] = x[0]
    labels = torch.randint(6, (n,), generator=gen)
    labels[0], labels[5], labels[9] = 0, 1, 0
    labels[-1] = 99  # a singleton class: excluded, but still a negative for the others
    return x, labels


def close(a, b, tol=1e-9):
    assert a.keys() <= b.keys()
    for key in a:
        assert abs(a[key] - b[key]) <= tol, (key, a[key], b[key])


@pytest.mark.parametrize("candidate", [torch.bfloat16, torch.float32])
def test_clustered_uneven_classes_match_float64(candidate):
    x, y = clustered(40, (1, 2, 3, 7), 16, noise=0.9, seed=0)
    ks = (1, 2, 4, 8, 1000)
    ranks = rank_positives(x, y, candidate=candidate, block=64)
    from vpt_dml.evaluation.retrieval import metrics_from_ranks

    close(
        brute_force(x, y, ks=ks),
        metrics_from_ranks(ranks.num_positives, ranks.negatives_above, ks, True),
    )


def test_ties_and_singletons_match_float64():
    x, y = tied(120, 8, seed=1)
    ours = retrieval_metrics(x, y, ks=(1, 2, 4, 8, 16))
    close(brute_force(x, y, ks=(1, 2, 4, 8, 16)), ours)


def test_gallery_protocol_matches_float64():
    x, y = clustered(30, (2, 3, 5), 12, noise=1.0, seed=2)
    q, ql, g, gl = x[::3], y[::3], x[1::3], y[1::3]
    ours = retrieval_metrics(q, ql, (1, 10, 20), g, gl)
    close(brute_force(q, ql, g, gl, ks=(1, 10, 20)), ours)
    # a query is no neighbour of itself when it is also in the gallery on purpose
    ours_dup = retrieval_metrics(q, ql, (1,), q, ql)
    assert ours_dup["recall@1"] == 1.0


def test_every_metric_reacts_to_one_swap():
    """A negative moved above a positive must lower the metrics (tests can fail)."""
    x = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [0.1, 0.995]])
    y = torch.tensor([0, 0, 1, 1])
    good = retrieval_metrics(x, y, (1,))
    assert good["recall@1"] == 1.0 and good["map@r"] == 1.0
    y_bad = torch.tensor([0, 1, 0, 1])
    bad = retrieval_metrics(x, y_bad, (1,))
    assert bad["recall@1"] == 0.0 and bad["map@r"] < 1.0 and bad["r_precision"] == 0.0
    # VPTSP variant: perfect ranking still scores R / (R + 1)
    assert good["map@r_vptsp"] == pytest.approx(0.5)  # float64


def test_matches_pytorch_metric_learning_on_tied_data():
    pml = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    x, y = tied(150, 8, seed=3)
    ours = retrieval_metrics(x, y, ks=(1,))
    # PML's knn order for exact ties is backend-defined; give it the float64 tie-broken
    # order (the definition we test above) and let it compute the metrics itself.
    xn = x / x.norm(dim=1, keepdim=True)
    sim = xn @ xn.T
    sim.fill_diagonal_(-torch.inf)
    order = torch.from_numpy(
        np.lexsort((np.broadcast_to(np.arange(len(x)), sim.shape), -sim.numpy()))
    )
    knn_labels = y[order[:, : len(x) - 1]]
    calc = pml.AccuracyCalculator(k="max_bin_count")
    labels_counts = torch.unique(y, return_counts=True)
    _, not_lone = pml.get_lone_query_labels(y, labels_counts, True, torch.eq)
    kw = dict(
        knn_labels=knn_labels,
        query_labels=y,
        not_lone_query_mask=not_lone,
        label_counts=labels_counts,
        ref_includes_query=True,
    )
    assert abs(calc.calculate_precision_at_1(**kw) - ours["recall@1"]) <= 1e-6
    assert abs(calc.calculate_mean_average_precision_at_r(**kw) - ours["map@r"]) <= 1e-6
    assert abs(calc.calculate_r_precision(**kw) - ours["r_precision"]) <= 1e-6


def test_matches_accuracy_calculator_end_to_end():
    pml = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    pytest.importorskip("faiss")
    x, y = clustered(60, (1, 2, 4, 6), 32, noise=0.8, seed=4)
    calc = pml.AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"), k="max_bin_count"
    )
    ref = calc.get_accuracy(x, y, x, y, ref_includes_query=True)
    ours = retrieval_metrics(x, y, ks=(1,))
    assert abs(ref["precision_at_1"] - ours["recall@1"]) <= 1e-6
    assert abs(ref["mean_average_precision_at_r"] - ours["map@r"]) <= 1e-6
    assert abs(ref["r_precision"] - ours["r_precision"]) <= 1e-6


@pytest.mark.parametrize("spread", [1.0, 0.05])
def test_error_bound_covers_bf16_rounding(spread):
    """|bf16 GEMM - float64| stays within the proven per-pair bound, also for near-duplicates."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(1, 512, generator=gen, dtype=torch.float64)
    x = base + spread * torch.randn(300, 512, generator=gen, dtype=torch.float64)
    x = torch.nn.functional.normalize(x, dim=1)
    xc = x.bfloat16()
    exact = x @ x.T
    approx = (xc @ xc.T).double()
    bounds = _Bounds(x, x, xc, xc, torch.bfloat16, torch.device("cpu"))
    eps = bounds.at(exact)
    assert ((approx - exact).abs() <= eps).all()
    assert eps.max() < 0.012  # a loose bound would make every entry a candidate


def test_skipped_items_are_dropped():
    x, y = clustered(10, (3,), 8, noise=0.5, seed=6)
    base = retrieval_metrics(x, y)
    junk = torch.cat([x, torch.randn(4, 8)])
    labels = torch.cat([y, torch.full((4,), -1)])
    assert retrieval_metrics(junk, labels) == base


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(ks=(0,)), "positive integers"),
        (dict(labels=torch.zeros(3, dtype=torch.long)), "labels"),
        (dict(embeddings=torch.full((6, 4), float("nan"))), "NaN"),
        (
            dict(
                embeddings=torch.randn(6, 4).index_put_(
                    (torch.tensor(4), torch.tensor(1)), torch.tensor(float("inf"))
                )
            ),
            "NaN or inf",
        ),
        (
            dict(
                gallery_embeddings=torch.randn(6, 4).index_put_(
                    (torch.tensor(2), torch.tensor(3)), torch.tensor(-float("inf"))
                ),
                gallery_labels=torch.tensor([0, 0, 1, 1, 2, 2]),
            ),
            "NaN or inf",
        ),
        (dict(gallery_embeddings=torch.ones(2, 4)), "both"),
        (dict(labels=torch.arange(6)), "singleton"),
    ],
)
def test_bad_input_is_one_clear_error(args, match):
    kw = dict(embeddings=torch.randn(6, 4), labels=torch.tensor([0, 0, 1, 1, 2, 2]))
    kw.update(args)
    with pytest.raises(UserError, match=match):
        retrieval_metrics(**kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_one_nan_anywhere_is_refused(dtype):
    """The finiteness check is a reduction: one NaN deep inside a large input still fails."""
    x, y = clustered(300, (3,), 64, noise=0.5, seed=9)
    x = x.to(dtype)
    x[len(x) // 2 + 7, 45] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        retrieval_metrics(x, y)
