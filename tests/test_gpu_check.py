"""experiments/gpu_check.py: its checks, its projection, its layouts, and the --cpu --tiny run."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import load_experiment
from PIL import Image

from vpt_dml.data.registry import load_splits

REPO = Path(__file__).resolve().parents[1]


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


# A thread of this process is running `import PIL.Image` (it holds that module's import
# lock, not the global one) when write_layouts starts its Pool; each worker then imports
# PIL.Image. A forked worker inherits the lock held by a thread it does not have and waits
# forever (what hung pytest: issue 30); a spawned one starts clean. Run in a fresh
# interpreter, so the import is really in flight, and killed with its workers if it hangs.
_IMPORT_IN_FLIGHT = """
import importlib.abc, importlib.util, sys, threading
from pathlib import Path

repo, out = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(repo))
spec = importlib.util.spec_from_file_location("gpu_check", repo / "experiments" / "gpu_check.py")
gc = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gc
spec.loader.exec_module(gc)
assert "PIL.Image" not in sys.modules, "the parent must not need PIL.Image"
entered, release = threading.Event(), threading.Event()


class StallingLoader(importlib.abc.Loader):
    def __init__(self, real):
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):  # runs under the module's lock only
        entered.set()
        release.wait()
        self.real.exec_module(module)


class Stall(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "PIL.Image" or threading.current_thread() is threading.main_thread():
            return None
        sys.meta_path.remove(self)
        found = importlib.util.find_spec(name)
        found.loader = StallingLoader(found.loader)
        return found


sys.meta_path.insert(0, Stall())
thread = threading.Thread(target=lambda: __import__("PIL.Image"), daemon=True)
thread.start()
entered.wait()
layouts = gc.write_layouts(out, tiny=True, procs=2)
release.set()
thread.join()
print("written", sum(v.train_images + v.test_images for v in layouts.values()))
"""


@pytest.mark.timeout(120)
def test_layouts_are_written_while_another_thread_is_importing(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _IMPORT_IN_FLIGHT, str(REPO), str(tmp_path / "data")],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its Pool workers too are killed below
    )
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"write_layouts hung with an import in flight in another thread:\n{out}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # workers left behind by a failed run
    assert proc.returncode == 0, out
    assert out.strip().splitlines()[-1] == "written 484"  # SOP 64x2 + 20x5, CUB 64x4


# -- the whole tiny run -------------------------------------------------------------------
def _env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
    }


def _gpu_check(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "gpu_check.py"), "--cpu", "--tiny", *flags]
        + ["--workdir", str(tmp_path)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_smoke_phase_runs_every_path_once_then_stops(tmp_path):
    """--smoke-only: per preset train (evaluation before, 2 epochs, test), resume from
    last.ckpt to a third epoch, export -> embed -> retrieve; no measured run starts."""
    proc, summary = _gpu_check(tmp_path, "--smoke-only")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary["ok"] and summary["smoke"]["failures"] == []
    assert "presets" not in summary  # the measured runs did not start
    for name in ("sop_deep", "cub_deep"):
        r = summary["smoke"]["presets"][name]
        assert list(r["steps"]) == ["train", "resume", "export", "embed", "retrieve"]
        assert all(step["rc"] == 0 for step in r["steps"].values())
        assert r["train"]["final_epoch"] == 1 and r["resume"]["final_epoch"] == 2
        assert r["train"]["status"] == r["resume"]["status"] == "finished"


@pytest.mark.slow
def test_a_failing_smoke_phase_keeps_the_measured_runs_from_starting(tmp_path):
    proc, summary = _gpu_check(
        tmp_path, "--presets", "cub_deep", "--override", "model.embed_dim=abc"
    )
    assert proc.returncode == 1
    assert not summary["ok"] and "presets" not in summary
    assert any("smoke cub_deep_train" in f and "embed_dim" in f for f in summary["failures"])
    assert "the smoke phase failed" in proc.stdout


@pytest.mark.slow
def test_cpu_tiny_run_trains_both_presets_and_projects(tmp_path):
    env = _env()
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "gpu_check.py"), "--cpu", "--tiny"]
        + ["--skip-smoke", "--workdir", str(tmp_path), "--out", str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["failures"] == []
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text()) == summary
    batches = {"sop_deep": 32, "cub_deep": 64}  # METHOD.md §3: the presets' own batches
    for name, batch in batches.items():
        r = summary["presets"][name]
        assert r["rc"] == 0
        assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"])
        assert r["metrics"]["recall@1"] is not None
        for key, value in r["metrics"].items():
            assert 0.0 <= value <= 1.0, (name, key, value)
        assert [e["label"] for e in r["evals"]][0] == "before"
        assert r["evals"][-1]["label"] == "test"
        assert r["as_run"]["batch_size"] == batch
        assert r["train_images_per_s"] > 0
        # the run's own record, not a second measurement
        assert r["train_images_per_s"] == round(r["cost"]["train_images_per_s"], 1)
        assert r["evals"][-1]["s"] == r["cost"]["test_eval_s"]
        assert r["projection"]["hours"] > 0
    # the host class-prompt bank (SOP) was found and timed; CUB keeps its prompts on device
    assert summary["presets"]["sop_deep"]["bank"]["host"]["step_ms_per_step"] > 0
    assert summary["presets"]["cub_deep"]["bank"] is None
    assert summary["bench"]["bench_eval"]["rc"] == 0
    assert not any(p.exists() for p in tmp_path.glob("gpu_check_*"))  # temp folder removed
