"""experiments/gpu_check.py --cpu --tiny (and its smoke phase) end to end, as documented."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_gpu_check import REPO, _env


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
