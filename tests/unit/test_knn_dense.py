"""The dense path (a block side counted entry by entry when its candidates explode) gives
exactly the candidate path's metrics and a float64 stable sort's, on the inputs that made
the candidate path slow: random, collapsed, half-collapsed, and exact ties between
distinct vectors; and its exact re-scoring stays linear in N on collapsed input."""

from __future__ import annotations

import pytest
import torch
from test_retrieval import metrics_from_similarity

from vpt_dml.evaluation.knn import _distinct_ids, exact_dot, rank_positives, unit_rows
from vpt_dml.evaluation.retrieval import metrics_from_ranks

KS = (1, 2, 4, 8)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def embeddings(kind: str, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=gen)
    if kind == "collapsed":
        x = x[:1].repeat(n, 1)
    elif kind == "half":  # every other row one vector, the rest random
        x[::2] = x[0]
    elif kind == "grid":  # small integers: many exact ties between distinct vectors
        x = torch.randint(-1, 2, (n, 16), generator=gen).double()
        x[:, 0] = 1.0  # no zero rows
    return x


def stable_sort_reference(q, ql, g=None, gl=None):
    """exact_dot of every pair (the similarity the ranking is defined by), then a stable
    sort in gallery order: ties by the lower gallery index."""
    uq = unit_rows(q)
    ug = uq if g is None else unit_rows(g)
    sim = exact_dot(uq[:, None, :], ug[None, :, :])
    return metrics_from_similarity(sim.numpy(), ql.numpy(), None if gl is None else gl.numpy(), KS)


def metrics(r, same):
    return metrics_from_ranks(r.num_positives, r.negatives_above, KS, same)


@pytest.mark.parametrize("kind", ["random", "collapsed", "half", "grid"])
@pytest.mark.parametrize("gallery", [False, True])
@pytest.mark.parametrize("max_rank", [None, 8])
@pytest.mark.parametrize("device", DEVICES)
def test_dense_and_candidate_paths_equal_a_float64_stable_sort(kind, gallery, max_rank, device):
    n = 200
    x = embeddings(kind, n, seed=len(kind))
    y = torch.randint(40, (n,), generator=torch.Generator().manual_seed(3))
    want = stable_sort_reference(*((x[:90], y[:90], x[90:], y[90:]) if gallery else (x, y)))
    x, y = x.to(device), y.to(device)
    args = (x[:90], y[:90], x[90:], y[90:]) if gallery else (x, y)
    got = {}
    for dense in (False, True, None):  # 130 gallery items: several blocks and tiles
        r = rank_positives(*args, block=64, tile=64, max_rank=max_rank, dense=dense)
        got[dense] = metrics(r, not gallery)
        if dense:
            assert r.dense_entries > 0
        elif dense is False:
            assert r.dense_entries == 0
    assert got[False] == got[True] == got[None]
    bad = {k: (want[k], got[True][k]) for k in want if abs(want[k] - got[True][k]) > 1e-12}
    assert not bad, bad


@pytest.mark.parametrize("workers", [1, 2])
def test_dense_sides_of_symmetric_blocks_count_both_ways(workers):
    """Off-diagonal blocks serve their rows and their columns: both sides dense."""
    x = embeddings("half", 300, seed=5)
    y = torch.randint(70, (300,), generator=torch.Generator().manual_seed(5))
    want = stable_sort_reference(x, y)
    r = rank_positives(x, y, block=64, workers=workers, dense=True)
    got = metrics(r, True)
    assert all(abs(want[k] - got[k]) <= 1e-12 for k in want)


def test_reduced_float32_matmul_precision_still_exact():
    """Under TF32 / bfloat16 float32 matmuls the dense GEMM runs in float64 instead."""
    x = embeddings("grid", 160, seed=2)
    y = torch.randint(30, (160,), generator=torch.Generator().manual_seed(2))
    want = metrics(rank_positives(x, y, block=64, dense=False), True)
    before = torch.get_float32_matmul_precision()
    try:
        for precision in ("high", "medium"):
            torch.set_float32_matmul_precision(precision)
            assert metrics(rank_positives(x, y, block=64, dense=True), True) == want
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("kind", ["collapsed", "half"])
def test_collapsed_input_rescores_linearly_not_quadratically(kind):
    """The cost finding: on collapsed embeddings every pair ties, and the candidate path
    re-scored each of the ~N^2 pairs one by one (minutes at N = 10,000). Counted densely,
    duplicated vectors are re-scored once per distinct pair of vectors and gallery block:
    at most N re-scores when collapsed, N per gallery block when half-collapsed (the
    candidate path: about N^2 / 2 here, every tied pair)."""
    n, block = 512, 64
    x = embeddings(kind, n, seed=1)
    y = torch.randint(100, (n,), generator=torch.Generator().manual_seed(1))
    r = rank_positives(x, y, block=block, max_rank=8)
    bound = n if kind == "collapsed" else n * (n // block)
    assert r.rescored <= bound, (r.rescored, bound)
    want = stable_sort_reference(x, y)
    got = metrics(r, True)
    assert all(abs(want[k] - got[k]) <= 1e-12 for k in want)


def test_distinct_ids_merge_equal_rows_only():
    """Rows one ulp apart keep their own ids; equal rows share one and its representative
    is an equal row."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    x = base[torch.tensor([0, 1, 0, 2, 1, 3, 4, 0])].clone()
    x[7, 3] = torch.nextafter(x[7, 3], torch.tensor(10.0, dtype=torch.float64))
    ids, reps = _distinct_ids(x)
    assert ids[0] == ids[2] and ids[1] == ids[4]
    assert len(set(ids.tolist())) == 6  # 0, 1, 2, 3, 4 and the nudged copy of 0
    assert torch.equal(x[reps[ids]], x)
