"""Paired bootstrap interval and permutation p-value (vpt_dml/evaluation/paired.py)."""

from __future__ import annotations

import numpy as np
import pytest

from vpt_dml.errors import UserError
from vpt_dml.evaluation import paired


def tables(first_a: np.ndarray, first_b: np.ndarray, labels: np.ndarray) -> tuple[dict, dict]:
    """Two per-query tables of the same queries (only the first-positive rank matters for
    recall@1; AP columns are set from it)."""

    def one(first):
        ap = 1.0 / first
        return {"index": np.arange(len(labels)), "label": labels, "positives": np.ones(len(labels)),
                "first_positive_rank": first, "ap_at_r": ap, "r_precision": (first == 1) * 1.0,
                "ap_vptsp": ap / 2}  # fmt: skip

    return one(first_a), one(first_b)


def test_planted_class_shift_is_covered_and_excludes_zero() -> None:
    rng = np.random.default_rng(1)
    classes, per_class = 60, 8
    labels = np.repeat(np.arange(classes), per_class)
    p_hit = 0.6
    first_a = np.where(rng.random(len(labels)) < p_hit, 1, rng.integers(2, 20, len(labels)))
    shifted = np.isin(labels, np.arange(0, classes, 3))  # every third class: 20 of 60
    first_b = first_a + shifted  # B ranks the first positive one deeper in those classes
    a, b = tables(first_a, first_b, labels)
    r = paired.compare_tables(a, b, ks=[1], resamples=4000)["recall@1"]
    # a hit at rank 1 becomes rank 2 in B: truth = P(hit) x share of shifted classes
    truth = p_hit * shifted.mean()
    assert r.low <= truth <= r.high
    assert r.low > 0
    assert r.diff == pytest.approx(((first_a <= 1) & shifted).mean())  # float64
    assert r.p < 0.001


def test_identical_runs_give_exactly_zero_interval_and_p_one() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 4)
    first = rng.integers(1, 5, len(labels))
    a, b = tables(first, first.copy(), labels)
    for r in paired.compare_tables(a, b, ks=[1, 2]).values():
        assert (r.diff, r.low, r.high, r.p) == (0.0, 0.0, 0.0, 1.0)


def test_class_resampling_is_wider_than_query_resampling_when_classes_correlate() -> None:
    rng = np.random.default_rng(3)
    classes, per_class = 40, 25
    labels = np.repeat(np.arange(classes), per_class)
    # every query of a class shares the class's effect: the class is the unit
    diff = np.repeat(rng.normal(0.0, 1.0, classes), per_class) + rng.normal(0, 0.05, len(labels))
    lo_c, hi_c = paired.bootstrap_interval(diff, labels, "class", resamples=3000)
    lo_q, hi_q = paired.bootstrap_interval(diff, labels, "query", resamples=3000)
    # sqrt(per_class) = 5x in theory
    assert hi_c - lo_c > 3 * (hi_q - lo_q)


def test_permutation_p_equals_the_exact_test_by_hand() -> None:
    # recall@1 differences per query: class 0: [1, 0], class 1: [1, 1], class 2: [-1]
    labels = np.array([0, 0, 1, 1, 2])
    first_a = np.array([1, 1, 1, 1, 3])
    first_b = np.array([2, 1, 2, 2, 1])
    a, b = tables(first_a, first_b, labels)
    # class sums (1, 2, -1), observed |T| = 2; the 8 sign flips give
    # |±1 ±2 ±1| = 4, 2, 2, 0, 0, 2, 2, 4: six are >= 2, so p = 6 / 8
    r = paired.compare_tables(a, b, ks=[1])["recall@1"]
    assert (r.p, r.p_exact) == (0.75, True)
    # flipping single queries instead (the wrong unit) would give 10 / 16
    assert r.p != 10 / 16


def test_different_query_sets_are_refused() -> None:
    labels = np.repeat(np.arange(3), 2)
    a, b = tables(np.ones(6, int), np.ones(6, int), labels)
    b["index"] = b["index"] + 1
    with pytest.raises(UserError, match="different query sets"):
        paired.compare_tables(a, b, ks=[1])


def test_rows_are_paired_by_dataset_index_not_by_position() -> None:
    labels = np.repeat(np.arange(4), 2)
    first_a = np.array([1, 2, 1, 2, 1, 2, 1, 2])
    a, b = tables(first_a, first_a.copy(), labels)
    order = np.arange(8)[::-1]  # b's rows in another order: the same results
    b = {k: np.asarray(v)[order] for k, v in b.items()}
    assert paired.compare_tables(a, b, ks=[1])["recall@1"].diff == 0.0


def test_seed_level_needs_matching_seeds() -> None:
    mean, low, high, n = paired.seed_level({0: 0.6, 1: 0.7}, {0: 0.5, 1: 0.5})
    assert (n, mean) == (2, pytest.approx(0.15)) and low < mean < high  # float64
    with pytest.raises(UserError, match="same seeds"):
        paired.seed_level({0: 0.6, 1: 0.7}, {0: 0.5, 2: 0.5})
