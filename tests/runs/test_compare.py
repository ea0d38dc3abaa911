"""`python -m vpt_dml.compare RUN_A RUN_B`: paired differences, refused across splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vpt_dml.compare import main
from vpt_dml.evaluation import per_query
from vpt_dml.evaluation.protocol import stamp_of

KS = [1, 2]


def fake_run(folder: Path, first: np.ndarray, labels: np.ndarray, split: str = "a" * 64,
             seed: int = 0, ks: list[int] = KS) -> Path:  # fmt: skip
    """A finished run folder as vpt_dml.run leaves it: metrics.json + per-query files."""
    cols = {"index": np.arange(len(labels)), "label": labels, "positives": np.ones(len(labels), int),
            "first_positive_rank": first, "ap_at_r": 1.0 / first, "r_precision": (first == 1) * 1.0,
            "ap_vptsp": 0.5 / first, "_lone_queries": 0}  # fmt: skip
    for kind in ("best", "final"):
        meta = {"ks": ks, "max_rank_exact": max(ks)}  # as per_query.save_evaluation writes
        per_query.write(folder / "per_query" / f"test_{kind}.parquet", cols, meta)
    metrics = per_query.means(cols, ks)
    fields = {"split_sha256": split, "image_resolution": 32, "ks": ks}
    result = {
        "status": "finished",
        "metrics": metrics,
        "final": {"metrics": metrics},
        "best": {"metrics": metrics},
        "protocol": {"stamp": stamp_of(fields), **fields},
        "provenance": {"seed": seed},
    }
    (folder / "metrics.json").write_text(json.dumps(result))
    return folder


def test_compare_prints_the_difference_with_interval_and_p(tmp_path: Path, capsys) -> None:
    labels = np.repeat(np.arange(12), 3)
    first_b = np.tile([1, 2, 3], 12)
    first_a = np.where(labels < 6, 1, first_b)  # A finds the first positive at 1 in 6 classes
    a = fake_run(tmp_path / "a", first_a, labels)
    b = fake_run(tmp_path / "b", first_b, labels)
    assert main([str(a), str(b), "--resamples", "2000"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| recall@1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # A: 6 classes all hits + 6 classes 1 of 3 = 24/36; B: 12/36
    assert cells[1:4] == ["66.67", "33.33", "+33.33"]
    low, high = (float(x) for x in cells[4].strip("[]").split(","))
    assert 0 < low < 33.33 < high
    # exact over 2^12 flips: the 6 equal nonzero class sums reach |T| only all alike
    assert float(cells[5]) == 2 / 2**6


def test_compare_on_different_splits_is_refused(tmp_path: Path, capsys) -> None:
    labels = np.repeat(np.arange(4), 2)
    first = np.ones(8, int)
    a = fake_run(tmp_path / "a", first, labels, split="a" * 64)
    b = fake_run(tmp_path / "b", first, labels, split="b" * 64)
    assert main([str(a), str(b)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "different test splits" in err and "\n" not in err


def test_compare_of_seed_sweeps_pairs_by_seed(tmp_path: Path, capsys) -> None:
    labels = np.repeat(np.arange(4), 2)
    for seed, (ra, rb) in enumerate([(1, 2), (1, 3)]):
        fake_run(tmp_path / "A" / str(seed), np.full(8, ra), labels, seed=seed)
        fake_run(tmp_path / "B" / str(seed), np.full(8, rb), labels, seed=seed)
    assert main([str(tmp_path / "A"), str(tmp_path / "B")]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| recall@1 |"))
    assert "+100.00" in row and row.rstrip("| ").endswith("2")
    fake_run(tmp_path / "B" / "1", np.full(8, 3), labels, seed=5)  # seeds no longer match
    assert main([str(tmp_path / "A"), str(tmp_path / "B")]) == 2
    assert "same seeds" in capsys.readouterr().err


def test_compare_only_the_recall_cut_offs_both_runs_measured(tmp_path: Path, capsys) -> None:
    """Run B measured ranks only to 8: its first-positive ranks past 8 are not exact, so
    recall@16 / @32 are not compared (issue 28 item 4); each side's order does not matter."""
    labels = np.repeat(np.arange(40), 2)
    first_a = np.tile([1, 20], 40)
    first_b = np.tile([1, 9], 40)  # 9: "deeper than 8", its real rank may be 100
    a = fake_run(tmp_path / "a", first_a, labels, ks=[1, 2, 4, 8, 16, 32])
    b = fake_run(tmp_path / "b", first_b, labels, ks=[1, 2, 4, 8])
    for args in ([a, b], [b, a]):
        assert main([str(args[0]), str(args[1]), "--resamples", "200"]) == 0
        out = capsys.readouterr().out
        rows = [ln.split("|")[1].strip() for ln in out.splitlines() if ln.startswith("| recall@")]
        assert rows == ["recall@1", "recall@2", "recall@4", "recall@8"]
        note = [ln for ln in out.splitlines() if "recall@32" in ln]
        assert len(note) == 1 and "recall@16" in note[0] and "one run only" in note[0]


def test_a_class_bootstrap_over_few_classes_warns(tmp_path: Path, capsys) -> None:
    labels = np.repeat(np.arange(4), 5)
    a = fake_run(tmp_path / "a", np.where(labels == 0, 1, 2), labels)
    b = fake_run(tmp_path / "b", np.full(20, 2), labels)
    assert main([str(a), str(b), "--resamples", "200"]) == 0
    out = capsys.readouterr().out
    warning = [ln for ln in out.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1 and "4 classes" in warning[0] and "0.125" in warning[0]
    many = np.repeat(np.arange(30), 2)
    a = fake_run(tmp_path / "a2", np.where(many < 10, 1, 2), many)
    b = fake_run(tmp_path / "b2", np.full(60, 2), many)
    assert main([str(a), str(b), "--resamples", "200"]) == 0
    assert "warning" not in capsys.readouterr().out
