"""Issue 19 finding 5: a non-finite loss stops the run at that step, says where and under
which precision, writes metrics.json "status": "diverged", and keeps last.ckpt at the last
finite epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, cli_in_process, compose_config, tiny_overrides
from vpt_dml.checkpoints import load_checkpoint
from vpt_dml.losses import ProxyAnchorLoss
from vpt_dml.run import train
from vpt_dml.runs.callbacks.divergence import DIVERGED_EXIT, FP16_PATIENCE, Diverged

STEPS_PER_EPOCH = 3  # tiny settings: 4 training classes x 6 images, batches of 8


class NaNFromStep(ProxyAnchorLoss):
    """Proxy Anchor whose loss is NaN from training step `nan_from_step` (1-based) on."""

    def __init__(self, nan_from_step: int, **kw) -> None:
        super().__init__(**kw)
        self.nan_from_step, self.calls = nan_from_step, 0

    def forward(self, *args, **kw):
        self.calls += 1
        loss = super().forward(*args, **kw)
        return loss * float("nan") if self.calls >= self.nan_from_step else loss


NAN_LOSS = [f"loss._target_={__name__}.NaNFromStep"]


def all_finite(ckpt: dict) -> bool:
    state = [ckpt["state_dict"], ckpt["optimizer_states"]]
    flat = []

    def walk(o):
        if torch.is_tensor(o):
            flat.append(o)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(state)
    return bool(flat) and all(torch.isfinite(t).all() for t in flat if t.is_floating_point())


def test_nan_loss_stops_at_that_step_and_keeps_the_last_finite_epoch(tmp_path):
    nan_step = 2 * STEPS_PER_EPOCH + 2  # epoch 2, its second batch
    every = tmp_path / "every_epoch"
    cfg = compose_config(
        tiny_overrides(
            "trainer.max_epochs=5",
            *NAN_LOSS,
            f"+loss.nan_from_step={nan_step}",
            # an independent copy of each epoch-end state, to compare last.ckpt with
            "+callbacks.every_epoch={_target_: lightning.pytorch.callbacks.ModelCheckpoint,"
            f" dirpath: '{every}', filename: 'e{{epoch}}', save_top_k: -1, monitor: null, mode: max,"
            " auto_insert_metric_name: false}",
        ),
        tmp_path,
    )
    with pytest.raises(Diverged) as caught:
        train(cfg)
    line = str(caught.value)
    assert "\n" not in line
    assert f"at step {nan_step} (epoch 2, batch 1)" in line
    assert "trainer.precision=32-true" in line and "fp16" not in line
    out = Path(cfg.paths.output_dir)
    result = json.loads((out / "metrics.json").read_text())
    assert result["status"] == "diverged"
    assert result["diverged"]["step"] == nan_step and result["diverged"]["precision"] == "32-true"
    assert result["final"] is None and result["eval"]["evaluated_epochs"] == [0, 1]

    last = load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 1 and last["global_step"] == 2 * STEPS_PER_EPOCH
    assert all_finite(last)
    reference = load_checkpoint(every / "e1.ckpt")
    assert sorted(p.name for p in every.iterdir()) == ["e0.ckpt", "e1.ckpt"]
    for name, tensor in reference["state_dict"].items():
        assert torch.equal(last["state_dict"][name], tensor), name
    # every checkpoint left in the run folder is finite
    for path in (out / "checkpoints").glob("*.ckpt"):
        assert all_finite(load_checkpoint(path)), path


@pytest.mark.slow
def test_huge_lr_is_one_diverged_line_and_exit_3(tmp_path):
    out = tmp_path / "run"
    res = cli_in_process(
        tiny_overrides("trainer.max_epochs=3", "optim.lr=1e20")
        + [f"hydra.run.dir={out}", f"paths.data_dir={tmp_path / 'data'}"],
        cwd=REPO,
    )
    assert res.returncode == DIVERGED_EXIT, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("diverged:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert "at step 2 " in lines[0] and "trainer.precision=32-true" in lines[0]
    assert "fp16" not in res.stderr + res.stdout
    assert json.loads((out / "metrics.json").read_text())["status"] == "diverged"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed needs a CUDA device")
def test_fp16_stops_after_consecutive_skipped_steps(tmp_path):
    nan_step = STEPS_PER_EPOCH + 1
    cfg = compose_config(
        tiny_overrides(
            "trainer.max_epochs=6",
            "trainer.accelerator=gpu",
            "trainer.precision=16-mixed",
            *NAN_LOSS,
            f"+loss.nan_from_step={nan_step}",
        ),
        tmp_path,
    )
    with pytest.raises(Diverged) as caught:
        train(cfg)
    info = caught.value.info
    # the scaler skipped the first ones: the run stopped after FP16_PATIENCE in a row,
    # naming the first
    assert info["consecutive_steps"] == FP16_PATIENCE and info["step"] == nan_step
    assert "trainer.precision=16-mixed" in str(caught.value)
    last = load_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert all_finite(last)
