"""Paired comparison of two runs on the same test queries: bootstrap interval and
permutation p-value of the difference of every metric.

The unit of independence in a class-disjoint split is the class (its queries share one
gallery neighbourhood and move together), so both the bootstrap and the permutation act
on classes: the bootstrap draws classes with replacement and recomputes the query-level
mean difference of the drawn classes (percentile interval); the permutation swaps A and
B for whole classes (a sign flip of each class's summed difference), exactly over all
2^C flips for C <= EXACT_CLASSES classes, else over random flips ((1 + hits) / (1 + R)).
`unit="query"` resamples queries instead (only to show how much too narrow it is).

Across seeds (`seed_level`): the per-seed differences of the run-level metric, paired by
seed, with a Student-t interval.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from vpt_dml.errors import UserError

CONFIDENCE = 0.95
RESAMPLES = 10_000
EXACT_CLASSES = 16
# Below this many classes the class bootstrap's interval is unreliable (few distinct
# resamples; percentile intervals undercover) and the permutation p has a coarse floor.
MIN_CLASSES = 20
CHUNK = 256  # bootstrap draws per matrix product (bounds memory on SOP's 11k classes)


def metric_values(columns: dict, ks) -> dict[str, np.ndarray]:
    """Per-query value of each metric: its mean over queries is the metric."""
    first = np.asarray(columns["first_positive_rank"])
    out = {f"recall@{k}": (first <= k).astype(np.float64) for k in ks}
    out["map@r"] = np.asarray(columns["ap_at_r"], dtype=np.float64)
    out["r_precision"] = np.asarray(columns["r_precision"], dtype=np.float64)
    out["map@r_vptsp"] = np.asarray(columns["ap_vptsp"], dtype=np.float64)
    return out


def align(a: dict, b: dict) -> tuple[np.ndarray, np.ndarray]:
    """Row order of b matching a's queries, and the class of each query; refuses tables of
    different query sets (another split, other skipped images, other classes)."""
    ia, ib = np.asarray(a["index"]), np.asarray(b["index"])
    if len(ia) != len(ib) or not np.array_equal(np.sort(ia), np.sort(ib)):
        only_a = len(np.setdiff1d(ia, ib))
        only_b = len(np.setdiff1d(ib, ia))
        raise UserError(
            f"the two runs ranked different query sets ({len(ia)} vs {len(ib)} queries; "
            f"{only_a} only in the first, {only_b} only in the second): compare runs "
            "evaluated on one test split"
        )
    pos = np.argsort(ib, kind="stable")
    order_b = pos[np.searchsorted(ib[pos], ia)]
    if not np.array_equal(np.asarray(a["label"]), np.asarray(b["label"])[order_b]):
        raise UserError("the two runs label the same queries differently: not one test split")
    return order_b, np.asarray(a["label"])


@dataclass
class Paired:
    """Difference (A - B) of one metric with its interval and p-value."""

    a: float
    b: float
    diff: float
    low: float
    high: float
    p: float
    classes: int
    p_exact: bool


def class_sums(diff: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class: summed difference and query count."""
    _, inverse = np.unique(classes, return_inverse=True)
    sums = np.bincount(inverse, weights=diff)
    counts = np.bincount(inverse).astype(np.float64)
    return sums, counts


def bootstrap_interval(
    diff: np.ndarray,
    classes: np.ndarray,
    unit: str = "class",
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile interval of the mean difference, resampling classes (or queries)."""
    if unit == "class":
        sums, counts = class_sums(diff, classes)
    elif unit == "query":
        sums, counts = diff.astype(np.float64), np.ones(len(diff))
    else:
        raise ValueError(f"unit must be 'class' or 'query', got {unit!r}")
    if not np.any(sums):  # identical per-query results: every draw is exactly 0
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    units = len(sums)
    stats = np.empty(resamples)
    for start in range(0, resamples, CHUNK):
        n = min(CHUNK, resamples - start)
        draws = rng.multinomial(units, np.full(units, 1.0 / units), size=n).astype(np.float64)
        stats[start : start + n] = (draws @ sums) / (draws @ counts)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return float(low), float(high)


def smallest_p(classes: int, resamples: int = RESAMPLES) -> float:
    """The smallest p `permutation_p` can return with this many classes."""
    if classes <= EXACT_CLASSES:
        return 2.0 / 2**classes  # the observed flip and its mirror image
    return 1.0 / (1 + resamples)


def permutation_p(
    diff: np.ndarray, classes: np.ndarray, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, bool]:
    """Two-sided p-value of the mean difference under class-level sign flips; (p, exact)."""
    sums, _ = class_sums(diff, classes)
    observed = abs(sums.sum())
    if observed == 0:
        return 1.0, True
    tol = 1e-12 * max(1.0, np.abs(sums).sum())  # the observed flip must count as a hit
    if len(sums) <= EXACT_CLASSES:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(sums))))
        hits = int((np.abs(signs @ sums) >= observed - tol).sum())
        return hits / len(signs), True
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, resamples, CHUNK):
        n = min(CHUNK, resamples - start)
        signs = rng.choice((1.0, -1.0), size=(n, len(sums)))
        hits += int((np.abs(signs @ sums) >= observed - tol).sum())
    return (1 + hits) / (1 + resamples), False


def compare_tables(
    a: dict, b: dict, ks, resamples: int = RESAMPLES, seed: int = 0
) -> dict[str, Paired]:
    """Every metric's A - B on the same queries (class bootstrap and permutation)."""
    order_b, classes = align(a, b)
    va, vb = metric_values(a, ks), metric_values(b, ks)
    out = {}
    for metric in va:
        x, y = va[metric], vb[metric][order_b]
        d = x - y
        low, high = bootstrap_interval(d, classes, "class", resamples, seed)
        p, exact = permutation_p(d, classes, resamples, seed)
        out[metric] = Paired(float(x.mean()), float(y.mean()), float(x.mean() - y.mean()),
                             low, high, p, len(np.unique(classes)), exact)  # fmt: skip
    return out


def seed_level(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, float, int]:
    """(mean difference, low, high, n) of A - B over the seeds both sides ran."""
    if set(a) != set(b):
        raise UserError(
            f"seed-level comparison needs the same seeds on both sides: {sorted(a)} vs "
            f"{sorted(b)}; run the missing seeds or compare single runs"
        )
    d = np.array([a[s] - b[s] for s in sorted(a)])
    n = len(d)
    mean = float(d.mean())
    if n < 2:
        return mean, math.nan, math.nan, n
    from scipy.stats import t

    half = float(t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * float(d.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half, n
