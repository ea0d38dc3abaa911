"""SIGTERM (SLURM preemption, docker stop) to a run trained in this process, in its first
epoch: last.ckpt holds the mid-epoch state, metrics.json "interrupted", a resume finishes
(through real processes, exit 143: tests/processes/test_sigterm.py)."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import lightning as L
import pytest
from conftest import compose_config, tiny_overrides

from vpt_dml.checkpoints import load_checkpoint
from vpt_dml.run import Interrupted, train


class SigtermAt(L.Callback):
    """Sends this process SIGTERM after batch `batch` of epoch `epoch` (as a scheduler would)."""

    def __init__(self, epoch: int = 0, batch: int = 0) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


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
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="mid-epoch state"):
        train(cfg)
    # the run's watchdog is disarmed and its handler gone: armed, it ended this process
    # (the whole test session) 120 s later with exit 143
    assert signal.getsignal(signal.SIGTERM) is handler
    assert not [t for t in threading.enumerate() if isinstance(t, threading.Timer)]
    run_dir = Path(cfg.paths.output_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["status"] == "interrupted"
    assert result["interrupted"]["mid_epoch"] is True
    assert result["interrupted"]["completed_epochs"] == 0
    ckpt = load_checkpoint(last)
    assert ckpt["global_step"] == 1  # one step done before the signal
    assert ckpt["callbacks"]["ExactResume"]["mid_epoch"] is True
    # no DataLoader workers and a (seed, epoch) sampler: the mid-epoch state is exact (RNG kept)
    assert ckpt["callbacks"]["ExactResume"]["exact"] is True
    assert ckpt["callbacks"]["ExactResume"]["rng"] is not None

    resumed = compose_config(
        tiny_overrides("trainer.max_epochs=2", "eval_before_training=false", f"ckpt_path={last}"),
        tmp_path,
    )
    metrics = train(resumed)
    assert "recall@1" in metrics
    assert json.loads((run_dir / "metrics.json").read_text()).get("status") != "interrupted"
