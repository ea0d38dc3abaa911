"""SIGTERM (SLURM preemption, docker stop): exit 143, last.ckpt, metrics.json "interrupted"."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
from conftest import REPO, compose_config, run_cli, tiny_overrides

from vpt_dml.checkpoints import load_checkpoint
from vpt_dml.export import export_run
from vpt_dml.run import Interrupted, train


class SigtermAt(L.Callback):
    """Sends this process SIGTERM after batch `batch` of epoch `epoch` (as a scheduler would)."""

    def __init__(self, epoch: int = 0, batch: int = 0) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_mid_run_exits_143_with_checkpoint_and_interrupted_metrics(tmp_path: Path):
    run_dir = tmp_path / "run"
    args = [
        *tiny_overrides("trainer.max_epochs=1000", "eval_before_training=false"),
        f"hydra.run.dir={run_dir}",
        f"paths.data_dir={tmp_path / 'data'}",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vpt_dml.run", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(run_dir / "checkpoints" / "last.ckpt", proc)
        # a second run into the folder of a live one stops before touching it
        second = run_cli(args, cwd=REPO)
        assert second.returncode == 2 and "is in use by another run" in second.stderr
        assert "Traceback" not in second.stderr
        assert proc.poll() is None, "the first run must still be running"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    assert any(line.startswith("interrupted: SIGTERM") for line in stderr.splitlines()), stderr

    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["status"] == "interrupted"
    info = result["interrupted"]
    assert info["checkpoint"] == str(run_dir / "checkpoints" / "last.ckpt")
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert info["completed_epochs"] >= 1 and "val/recall@1" in result["metrics"]
    if not info["mid_epoch"]:  # the epoch-end checkpoint was kept
        assert ckpt["epoch"] + 1 == info["completed_epochs"]
    assert not (run_dir / "run.lock").exists()

    # a killed run exports from its last.ckpt (config_resolved.yaml was written at start)
    report = export_run(run_dir, tmp_path / "model.safetensors")
    assert report["tuned_tensors"] > 0 and (tmp_path / "model.safetensors").is_file()


def test_sigterm_in_the_first_epoch_saves_the_mid_epoch_state(tmp_path: Path):
    """Nothing to keep yet: last.ckpt gets the mid-epoch state, marked so; a resume finishes."""
    target = f"{SigtermAt.__module__}.SigtermAt"
    cfg = compose_config(
        tiny_overrides(
            "trainer.max_epochs=2",
            "eval_before_training=false",
            f"+callbacks.sigterm={{_target_: {target}, epoch: 0, batch: 0}}",
        ),
        tmp_path,
    )
    with pytest.raises(Interrupted, match="mid-epoch state"):
        train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["status"] == "interrupted"
    assert result["interrupted"]["mid_epoch"] is True
    assert result["interrupted"]["completed_epochs"] == 0
    ckpt = load_checkpoint(last)
    assert ckpt["global_step"] == 1  # one step done before the signal
    assert ckpt["callbacks"]["ExactResume"]["mid_epoch"] is True
    assert ckpt["callbacks"]["ExactResume"]["rng"] is None  # no RNG state to restore mid-epoch

    resumed = compose_config(
        tiny_overrides("trainer.max_epochs=2", "eval_before_training=false", f"ckpt_path={last}"),
        tmp_path,
    )
    metrics = train(resumed)
    assert "recall@1" in metrics
    assert json.loads((run_dir / "metrics.json").read_text()).get("status") != "interrupted"
