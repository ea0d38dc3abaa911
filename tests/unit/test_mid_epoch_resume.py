"""Interruptions inside an epoch (SLURM's time-limit signal, SIGTERM), in process:

- the record never claims more than last.ckpt holds (read back from the file), and a run
  interrupted again before its first epoch ends saves its newer state (issue 31, finding 2:
  the second allocation's steps were lost and the record said "1 completed epoch");
- resumed from any step, the run equals the uninterrupted one bit for bit (sampler
  position, RNG, optimizer, class-prompt bank), so no requeue redoes or loses work."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from tests.conftest import compose_config, tiny_overrides
from vpt_dml.checkpoints import load_checkpoint
from vpt_dml.run import Interrupted, train


class SigtermAt(L.Callback):
    """SIGTERM to this process after the batch of index `batch` of epoch `epoch`."""

    def __init__(self, epoch: int = 0, batch: int = 0) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


EPOCHS = "trainer.max_epochs=2"
# 16 classes x 8 images, half for training, batches of 8: 8 steps per epoch
DATA = ["data.synthetic.num_classes=16", "data.synthetic.images_per_class=8"]


def run(tmp_path: Path, name: str, *extra: str, stop: tuple[int, int] | None = None):
    overrides = tiny_overrides(EPOCHS, "eval_before_training=false", *DATA, *extra)
    if stop is not None:
        target = f"{SigtermAt.__module__}.SigtermAt"
        overrides.append(
            f"+callbacks.sigterm={{_target_: {target}, epoch: {stop[0]}, batch: {stop[1]}}}"
        )
    cfg = compose_config(overrides, tmp_path)
    with open_dict(cfg):
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.paths.output_dir = str(tmp_path / name)
        cfg.hydra.runtime.output_dir = cfg.paths.output_dir
    out = Path(cfg.paths.output_dir)
    try:
        metrics = train(cfg)
    except Interrupted as e:
        return None, json.loads((out / "metrics.json").read_text()), str(e)
    return metrics, json.loads((out / "metrics.json").read_text()), None


def last(tmp_path: Path, name: str) -> Path:
    return tmp_path / name / "checkpoints" / "last.ckpt"


def assert_same_run(tmp_path: Path, name: str, straight: dict) -> None:
    a = load_checkpoint(last(tmp_path, "straight"))
    b = load_checkpoint(last(tmp_path, name))
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    for key, value in a["state_dict"].items():
        assert torch.equal(b["state_dict"][key], value), key
    for sa, sb in zip(a["optimizer_states"], b["optimizer_states"]):
        for pid, state in sa["state"].items():
            for k, t in state.items():
                assert torch.equal(sb["state"][pid][k], t), (pid, k)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_interrupted_twice_in_the_first_epoch_then_resumed_equals_the_straight_run(tmp_path):
    straight, _, _ = run(tmp_path, "straight")
    steps = load_checkpoint(last(tmp_path, "straight"))["global_step"] // 2
    assert steps >= 6, steps  # enough batches to stop twice inside epoch 0

    # allocation 1: stopped after 2 batches of epoch 0
    _, first, line = run(tmp_path, "run", stop=(0, 1))
    assert first["interrupted"]["global_step"] == 2 and first["interrupted"]["mid_epoch"]
    assert first["interrupted"]["completed_epochs"] == 0, line
    # allocation 2: resumed at step 2, stopped after 2 more batches, still in epoch 0
    ckpt = f"ckpt_path={last(tmp_path, 'run')}"
    _, second, line = run(tmp_path, "run", ckpt, stop=(0, 3))
    info = second["interrupted"]
    assert info["completed_epochs"] == 0 and info["mid_epoch"] is True, line
    saved = load_checkpoint(last(tmp_path, "run"))
    # its newer state was saved, and the record says what the file holds
    assert saved["global_step"] == info["global_step"] == 4, (saved["global_step"], info)
    assert saved["epoch"] == 0 and "1 completed epoch" not in line
    # allocation 3: runs to the end, equal to the uninterrupted run
    resumed, final, _ = run(tmp_path, "run", ckpt)
    assert final["status"] == "finished"
    assert resumed == straight
    assert_same_run(tmp_path, "run", straight)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_interrupted_after_an_epoch_boundary_then_resumed_equals_the_straight_run(tmp_path):
    straight, _, _ = run(tmp_path, "straight")
    _, first, line = run(tmp_path, "run", stop=(1, 2))
    info = first["interrupted"]
    saved = load_checkpoint(last(tmp_path, "run"))
    # the record is what the file holds, whichever state was kept
    assert (saved["global_step"], saved["epoch"]) == (
        info["global_step"],
        1 - (not info["mid_epoch"]),
    )
    assert info["completed_epochs"] == (1 if info["mid_epoch"] else saved["epoch"] + 1), line
    resumed, final, _ = run(tmp_path, "run", f"ckpt_path={last(tmp_path, 'run')}")
    assert final["status"] == "finished"
    assert resumed == straight
    assert_same_run(tmp_path, "run", straight)
