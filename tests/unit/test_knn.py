"""Clustering metrics, the DDP de-duplication helper, and the multi-block search paths."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from test_retrieval import brute_force, clustered, tied

from vpt_dml.errors import UserError
from vpt_dml.evaluation import clustering_metrics, retrieval_metrics
from vpt_dml.evaluation.clustering import _torch_kmeans, nmi, pair_f1
from vpt_dml.evaluation.epoch import unique_first
from vpt_dml.evaluation.knn import rank_positives
from vpt_dml.evaluation.retrieval import metrics_from_ranks


def ours(x, y, ks, g=None, gl=None, block=64, **kw):
    r = rank_positives(x, y, g, gl, block=block, **kw)
    return metrics_from_ranks(r.num_positives, r.negatives_above, ks, g is None)


# (block, tile, workers): one tile per block, several tiles per block; inline or threads
LAYOUTS = [(64, None, 1), (128, 64, 1), (192, 64, 3), (64, None, 2)]


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_threads_run_under_the_callers_inference_mode(workers):
    """Lightning evaluates under torch.inference_mode, which is thread-local: the block
    buffers made in it must be written by worker threads in it too (the demo crashed)."""
    x, y = clustered(60, (1, 4, 12), 24, noise=1.1, seed=0)
    plain = rank_positives(x, y, block=64, workers=workers)
    with torch.inference_mode():
        inside = rank_positives(x, y, block=64, workers=workers)
    assert torch.equal(plain.negatives_above, inside.negatives_above)


@pytest.mark.parametrize("block, tile, workers", LAYOUTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_many_blocks_with_retired_positives_match_float64(seed, block, tile, workers):
    """Big classes (R up to 11) over many blocks: bounds L retire deep positives mid-scan."""
    x, y = clustered(60, (1, 4, 12), 24, noise=1.1, seed=seed)
    ks = (1, 3, 30, 500)
    r = rank_positives(x, y, block=block, tile=tile, workers=workers)
    assert r.candidates > 0 and (r.negatives_above == len(x)).any()  # some were retired
    close = brute_force(x, y, ks=ks)
    got = metrics_from_ranks(r.num_positives, r.negatives_above, ks, True)
    for key in close:
        assert abs(close[key] - got[key]) <= 1e-9, key


@pytest.mark.parametrize("block, tile, workers", LAYOUTS)
def test_ties_over_blocks_and_gallery_blocks_match_float64(block, tile, workers):
    kw = dict(block=block, tile=tile, workers=workers)
    x, y = tied(200, 8, seed=7)
    want, got = brute_force(x, y, ks=(1, 5)), ours(x, y, (1, 5), **kw)
    assert all(abs(want[k] - got[k]) <= 1e-9 for k in want)
    q, ql, g, gl = x[:90], y[:90], x[90:], y[90:]
    want = brute_force(q, ql, g, gl, ks=(1, 5))
    got = ours(q, ql, (1, 5), g, gl, **kw)
    assert all(abs(want[k] - got[k]) <= 1e-9 for k in want)


def test_nmi_and_f1_match_definitions():
    sk = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(7, (300,), generator=gen)
    clusters = torch.where(
        torch.rand(300, generator=gen) < 0.7, labels, torch.randint(7, (300,), generator=gen)
    )
    assert nmi(labels, clusters) == pytest.approx(  # float64
        sk.normalized_mutual_info_score(labels, clusters), abs=1e-9
    )
    pairs = list(itertools.combinations(range(300), 2))
    i, j = map(np.array, zip(*pairs))
    same_class = (labels[i] == labels[j]).numpy()
    same_cluster = (clusters[i] == clusters[j]).numpy()
    tp = (same_class & same_cluster).sum()
    p, r = tp / same_cluster.sum(), tp / same_class.sum()
    assert pair_f1(labels, clusters) == pytest.approx(2 * p * r / (p + r), abs=1e-12)  # float64
    # relabelling clusters changes nothing; merging everything into one cluster does
    assert nmi(labels, clusters + 100) == pytest.approx(nmi(labels, clusters))  # float64
    assert nmi(labels, torch.zeros_like(labels)) == 0.0


@pytest.mark.parametrize("backend", ["default", "torch"])
def test_kmeans_recovers_separated_classes(backend):
    x, y = clustered(6, (20,), 16, noise=0.05, seed=3)
    if backend == "torch":
        clusters = _torch_kmeans(x, 6, seed=0, iters=20)
        assert nmi(y, clusters) > 0.95  # k-means++ seeding finds well-separated classes
    else:
        m = clustering_metrics(x, y)
        assert m["nmi"] > 0.85 and m["f1"] > 0.6
    noisy = clustering_metrics(torch.randn(120, 16), y)
    assert noisy["nmi"] < 0.5


def test_clustering_rejects_unclusterable_input():
    with pytest.raises(UserError, match="more items than classes"):
        clustering_metrics(torch.randn(4, 3), torch.arange(4))


def test_unique_first_drops_sampler_padding():
    """3 ranks, DistributedSampler-style: 10 items padded to 12 by repeating the first ones;
    all_gather stacks (rank, item) and flatten interleaves ranks."""
    n, ranks = 10, 3
    total = -(-n // ranks) * ranks
    order = list(range(n)) + list(range(total - n))  # padding repeats items 0, 1
    per_rank = [order[r::ranks] for r in range(ranks)]
    index = torch.tensor(per_rank).T.reshape(-1)  # what all_gather(...).flatten(0, 1) yields
    x, y = clustered(5, (2,), 8, noise=0.3, seed=0)
    emb, labels = x[index], y[index]
    uniq, first = unique_first(index)
    assert torch.equal(uniq, torch.arange(n))
    assert torch.equal(index[first], uniq)
    assert torch.equal(emb[first], x) and torch.equal(labels[first], y)
    # the de-duplicated rows score as the original set does (float64 reference) ...
    want = brute_force(x, y, ks=(1, 2, 4, 8))
    got = retrieval_metrics(emb[first], labels[first], (1, 2, 4, 8))
    assert want.keys() <= got.keys()
    assert all(abs(got[k] - want[k]) <= 1e-9 for k in want), (got, want)
    # ... and duplicates would double-count queries: without de-duplication they differ
    assert abs(retrieval_metrics(emb, labels)["map@r"] - want["map@r"]) > 1e-3


def test_poor_embeddings_stop_counting_at_max_rank():
    """Random embeddings: best positives deeper than the largest K are retired early, and
    the metrics still equal the float64 brute force for every K up to that depth."""
    gen = torch.Generator().manual_seed(8)
    x, y = torch.randn(400, 16, generator=gen), torch.randint(60, (400,), generator=gen)
    ks = (1, 4, 20)
    full = rank_positives(x, y, block=64)
    capped = rank_positives(x, y, block=64, max_rank=max(ks))
    assert capped.candidates < full.candidates / 2
    want = brute_force(x, y, ks=ks)
    for r in (full, capped):
        got = metrics_from_ranks(r.num_positives, r.negatives_above, ks, True)
        assert all(abs(want[k] - got[k]) <= 1e-9 for k in want)


@pytest.mark.parametrize("n, block", [(65, 64), (129, 64), (200, 64)])
def test_last_block_queries_get_candidates(n, block):
    """A query alone in (or with only its class in) the last block still counts the
    negatives above it: every query has a threshold before any block is scanned."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 8, generator=gen)
    y = torch.arange(n) % 20
    y[-3:] = 19  # the last rows: one class
    want = brute_force(x, y, ks=(1, 2, 4))
    got = ours(x, y, (1, 2, 4), block=block)
    assert all(abs(want[k] - got[k]) <= 1e-9 for k in want), (want, got)


@pytest.mark.parametrize("fail_in", ["stream", "compute"])
def test_a_failing_block_thread_raises_instead_of_hanging(monkeypatch, fail_in):
    """An error in a block thread reaches the caller; no thread waits for a buffer."""
    from vpt_dml.evaluation import knn

    real = getattr(knn._Block, fail_in)
    calls = []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("block failed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(knn._Block, fail_in, flaky)
    x, y = clustered(60, (4,), 8, noise=1.0, seed=1)
    with pytest.raises(RuntimeError, match="block failed"):
        rank_positives(x, y, block=64, workers=2)
