"""experiments/gpu_check.py: its checks, its projection, its layouts (the --cpu --tiny run:
tests/documented/test_gpu_check_cpu_tiny.py)."""

from __future__ import annotations

import argparse
import importlib
import os
import time
from pathlib import Path

import pytest
from conftest import load_experiment
from PIL import Image

from vpt_dml.data.registry import load_splits

REPO = Path(__file__).resolve().parents[2]


gc = load_experiment("gpu_check")


# -- checks ---------------------------------------------------------------------------
def _csv(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "metrics.csv"
    path.write_text("\n".join(["epoch,step,train/loss_step,val/recall@1,lr-AdamW/main", *rows]))
    return path


def test_csv_check_flags_a_non_finite_loss_and_a_metric_out_of_range(tmp_path):
    assert gc.check_csv(_csv(tmp_path, ["0,4,3.2,,0.1", "0,9,,0.5,"])) == []
    nan_loss = gc.check_csv(_csv(tmp_path, ["0,4,nan,,0.1"]))
    assert len(nan_loss) == 1 and "train/loss_step" in nan_loss[0]
    high = gc.check_csv(_csv(tmp_path, ["0,9,,1.5,"]))
    assert len(high) == 1 and "val/recall@1" in high[0]
    assert gc.check_csv(tmp_path / "absent.csv")  # a run without its csv is a failure


def test_metrics_json_check_reads_the_flat_and_the_nested_layouts():
    flat = {"metrics": {"recall@1": 0.5, "map@r": 0.2, "nmi": 0.7, "recall@1_before": 0.1}}
    assert gc.check_metrics_json(flat) == []
    nested = {
        "metrics": {"recall@1": 0.5},
        "final": {"test/recall@1": 0.5},
        "best": {"epoch": 7, "test/map@r": 1.2},
        "before": {"val/recall@1": float("nan")},
        "cost": {"train_s": 5400.0},
    }
    problems = gc.check_metrics_json(nested)
    assert len(problems) == 2
    assert any("best.test/map@r" in p for p in problems)
    assert any("before.val/recall@1" in p for p in problems)
    assert gc.check_metrics_json({"metrics": {"map@r": 0.3}}) == ["metrics.json holds no recall@1"]


def test_loss_check():
    assert gc.check_losses([3.0, 2.5]) == []
    assert "step 1" in gc.check_losses([3.0, float("inf"), float("nan")])[0]
    assert gc.check_losses([])


# -- projection -------------------------------------------------------------------------
def test_validated_epochs_follow_the_cadence():
    assert gc.validated_epochs(120, {"start_epoch": 30, "every_n_epochs": 1}, {}) == 90
    # epochs 30, 35, ..., 55 and the final one (59)
    assert gc.validated_epochs(60, {"start_epoch": 30, "every_n_epochs": 5}, {}) == 7
    assert gc.validated_epochs(60, {"start_epoch": 59, "every_n_epochs": 1}, {}) == 1
    assert gc.validated_epochs(60, {"start_epoch": 0}, {}) == 60
    # without eval.start_epoch / every_n_epochs: Lightning's check_val_every_n_epoch
    assert gc.validated_epochs(10, {"clustering_every_epoch": False}, {}) == 10
    assert gc.validated_epochs(10, {}, {"check_val_every_n_epoch": 3}) == 3


def test_projection_arithmetic():
    layout = gc.Layout("sop", Path("."), 100, 200, 200, 1000, (400, 400))
    cfg = {
        "trainer": {"max_epochs": 2},
        "data": {"batch_size": 32},
        "eval": {"start_epoch": 1, "every_n_epochs": 1},
    }
    probe = {
        "images_per_s": 100.0,
        "train_loop_s": 30.0,
        "evals": [
            {"label": "before", "s": 10.0, "images": 1000, "clustering_s": 0.0},
            {"label": "test", "s": 20.0, "images": 1000, "clustering_s": 4.0},
        ],
        "checkpoints": [{"file": "last.ckpt", "s": 1.0}, {"file": "best-epoch000.ckpt", "s": 2.0}],
    }
    p = gc.project(cfg, probe, layout, run_wall_s=100.0)
    train_s = 2 * (59551 // 32 * 32) / 100.0
    one_eval = 0.01 * 60502
    kmeans = 4.0 * (60502 * 11316) / (1000 * 200)
    eval_s = 3 * one_eval + kmeans + (20.0 - 10.0 - 4.0)  # before + 1 validated epoch + test
    ckpt_s = 2 * 1.0 + 1 * 2.0
    startup = 100.0 - (30.0 + 30.0 + 3.0)
    assert p["validated_epochs"] == 1 and p["evaluations"] == 3
    assert p["hours"] == pytest.approx((train_s + eval_s + ckpt_s + startup) / 3600, abs=1e-4)
    assert p["train_h"] == pytest.approx(train_s / 3600, abs=1e-4)


def test_the_measurements_are_the_runs_own_record():
    """Images/s, training and evaluation seconds come from metrics.json's cost block (the
    val seconds are its mean per evaluation); the probe adds which evaluations ran, their
    images and k-means seconds, and the checkpoint writes."""
    cost = {
        "train_images_per_s": 250.0,
        "train_s": 40.0,
        "eval_s": 6.0,
        "evaluations_during_training": 2,
        "before_eval_s": 5.0,
        "test_eval_s": 9.0,
    }
    probe = {
        "batch_size": 32,
        "evals": [
            {"label": "before", "images": 1000, "clustering_s": 1.0},
            {"label": "val", "images": 1000, "clustering_s": 1.0},
            {"label": "val", "images": 1000, "clustering_s": 1.5},
            {"label": "test", "images": 1000, "clustering_s": 2.0},
        ],
        "checkpoints": [{"file": "last.ckpt", "s": 1.0}],
    }
    seen = gc.measured(probe, cost)
    assert seen["images_per_s"] == 250.0 and seen["train_loop_s"] == 40.0
    assert [e["s"] for e in seen["evals"]] == [5.0, 6.0, 6.0, 9.0]
    assert [e["clustering_s"] for e in seen["evals"]] == [1.0, 1.0, 1.5, 2.0]
    layout = gc.Layout("cub", Path("."), 50, 1000, 50, 1000, (500, 375))
    cfg = {"trainer": {"max_epochs": 2}, "data": {"batch_size": 32}}
    p = gc.project(cfg, seen, layout, run_wall_s=100.0)
    assert p["startup_h"] == pytest.approx((100.0 - 40.0 - 26.0 - 1.0) / 3600, abs=1e-4)
    # a run that crashed before its test: no seconds recorded, that evaluation left out
    seen = gc.measured(probe, {k: v for k, v in cost.items() if k != "test_eval_s"})
    assert gc.project(cfg, seen, layout, run_wall_s=100.0)["startup_h"] == pytest.approx(
        (100.0 - 40.0 - 17.0 - 1.0) / 3600, abs=1e-4
    )


def test_skipped_benches_are_described(tmp_path):
    """--skip-bench: each entry of the bench block is described (it ended the check with
    "gpu_check.py itself failed: AttributeError" after both presets had run)."""
    lib = importlib.import_module("gpu_check_lib.benches")
    args = argparse.Namespace(skip_bench=True, cpu=True)
    out = lib.benches(args, tmp_path, deadline=time.monotonic() + 100)
    lines = [lib.describe_bench(label, b) for label, b in out.items()]
    assert lines and all(line.endswith("skipped: --skip-bench") for line in lines)
    assert lib.sop_vs_bench({"sop_deep": {"train_images_per_s": 10.0}}, out) is None


# -- layouts --------------------------------------------------------------------------
@pytest.mark.timeout(120)  # it once hung for 14 min: a forked Pool worker deadlocked (issue 30)
def test_tiny_layouts_parse_with_the_real_loaders(tmp_path):
    layouts = gc.write_layouts(tmp_path, tiny=True, procs=2)
    for name, layout in layouts.items():
        splits, _ = load_splits(name, str(layout.root))
        assert splits.summary() == {
            "train_images": layout.train_images,
            "train_classes": layout.train_classes,
            "test_images": layout.test_images,
            "test_classes": layout.test_classes,
        }
        with Image.open(splits.test.paths[-1]) as im:
            assert (im.format, im.size) == ("JPEG", layout.image_size)


# -- the whole tiny run -------------------------------------------------------------------
def _env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
    }
