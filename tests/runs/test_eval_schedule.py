"""eval.start_epoch / eval.every_n_epochs: skipped epochs, last.ckpt every epoch, exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict

import vpt_dml.run as run
import vpt_dml.runs.lifecycle as lifecycle
from tests.conftest import compose_config, tiny_overrides
from vpt_dml.errors import UserError
from vpt_dml.runs.callbacks.eval_schedule import evaluated
from vpt_dml.runs.trainer import build_trainer


@pytest.mark.parametrize(
    ("start", "every", "epochs", "expected"),
    [
        (0, 1, 3, [0, 1, 2]),
        (2, 1, 3, [2]),
        (0, 2, 4, [0, 2, 3]),  # the final epoch always
        (1, 3, 8, [1, 4, 7]),
        (5, 1, 3, [2]),  # start past the end: the final epoch only
    ],
)
def test_evaluated_epochs(start, every, epochs, expected):
    got = [e for e in range(epochs) if evaluated(e, start, every, last=e == epochs - 1)]
    assert got == expected


class CopyLastCheckpoint(L.Callback):
    """At each epoch start, keeps a copy of last.ckpt as the previous epoch left it."""

    def __init__(self, ckpt_dir: Path, into: Path) -> None:
        self.ckpt_dir, self.into = ckpt_dir, into

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch > 0:
            self.into.mkdir(parents=True, exist_ok=True)
            shutil.copy(
                self.ckpt_dir / "last.ckpt",
                self.into / f"after_epoch{trainer.current_epoch - 1}.ckpt",
            )


def tiny_run(tmp_path: Path, name: str, *extra: str, monkeypatch=None, copies: Path | None = None):
    cfg = compose_config(tiny_overrides(*extra), tmp_path)
    with open_dict(cfg):
        cfg.paths.data_dir = str(tmp_path / "data")  # one generated dataset for all runs
        cfg.paths.output_dir = str(tmp_path / name)
        cfg.hydra.runtime.output_dir = cfg.paths.output_dir
    out = Path(cfg.paths.output_dir)
    if copies is not None:
        build = lifecycle.build_trainer

        def with_copies(c):
            trainer, callbacks = build(c)
            trainer.callbacks.append(CopyLastCheckpoint(out / "checkpoints", copies))
            return trainer, callbacks

        monkeypatch.setattr(lifecycle, "build_trainer", with_copies)
    metrics = run.train(cfg)
    if copies is not None:
        monkeypatch.setattr(lifecycle, "build_trainer", build)
    result = json.loads((out / "metrics.json").read_text())
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    return metrics, result, ckpt


def val_epochs(result: dict) -> list[int]:
    return [r["epoch"] for r in result["history"] if r["stage"] == "val"]


def test_start_epoch_skips_early_epochs_and_resumes_exactly(tmp_path, monkeypatch):
    schedule = ("trainer.max_epochs=3", "eval.start_epoch=2")
    copies = tmp_path / "copies"
    straight, result, straight_ckpt = tiny_run(
        tmp_path, "straight", *schedule, monkeypatch=monkeypatch, copies=copies
    )
    # no validation in epochs 0-1 (CSV too), one at epoch 2, which is then the best
    assert val_epochs(result) == [2] == result["eval"]["evaluated_epochs"]
    csv_text = (tmp_path / "straight" / "csv" / "metrics.csv").read_text().splitlines()
    header = csv_text[0].split(",")
    epoch_col, val_col = header.index("epoch"), header.index("val/recall@1")
    val_rows = [r.split(",") for r in csv_text[1:] if r.split(",")[val_col] != ""]
    # one row per evaluation: the one before training (epoch 0, step 0) and epoch 2
    fit_rows = [r for r in val_rows if r[header.index("step")] != "0"]
    assert [int(r[epoch_col]) for r in fit_rows] == [2]
    assert result["best"]["epoch"] == 2
    assert torch.load(result["best"]["checkpoint"], weights_only=False)["epoch"] == 2
    # last.ckpt written at the end of every epoch, evaluated or not
    saved = sorted(copies.iterdir())
    assert [p.name for p in saved] == ["after_epoch0.ckpt", "after_epoch1.ckpt"]
    assert [torch.load(p, weights_only=False)["epoch"] for p in saved] == [0, 1]
    assert straight_ckpt["epoch"] == 2

    resumed, resumed_result, resumed_ckpt = tiny_run(
        tmp_path, "resumed", *schedule, f"ckpt_path={copies / 'after_epoch1.ckpt'}"
    )
    assert resumed_ckpt["global_step"] == straight_ckpt["global_step"]
    for key, value in straight_ckpt["state_dict"].items():
        torch.testing.assert_close(resumed_ckpt["state_dict"][key], value, rtol=0, atol=1e-6)
    assert val_epochs(resumed_result) == [2]
    assert resumed.keys() == straight.keys()
    for key, value in straight.items():
        assert abs(resumed[key] - value) <= 1e-6, key
    assert resumed_result["best"]["epoch"] == 2


def test_every_n_epochs_keeps_the_final_epoch(tmp_path):
    """Epoch 1 is skipped after a validation has run: the best-checkpoint callback sees the
    stale val/recall@1 and must neither fail nor save epoch 1 as best."""
    _, result, ckpt = tiny_run(tmp_path, "run", "trainer.max_epochs=4", "eval.every_n_epochs=2")
    assert val_epochs(result) == [0, 2, 3]
    assert result["best"]["epoch"] in (0, 2, 3)
    assert (
        torch.load(result["best"]["checkpoint"], weights_only=False)["epoch"]
        == result["best"]["epoch"]
    )
    assert ckpt["epoch"] == 3


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("eval.start_epoch=-1", "eval.start_epoch=-1"),
        ("eval.every_n_epochs=0", "eval.every_n_epochs=0"),
        ("trainer.check_val_every_n_epoch=2", "eval.every_n_epochs=2"),
    ],
)
def test_bad_schedule_is_a_user_error(tmp_path, override, words):
    cfg = compose_config(tiny_overrides(override), tmp_path)
    with pytest.raises(UserError, match=words):
        build_trainer(cfg)


def test_held_out_selection_needs_the_best_checkpoint(tmp_path):
    cfg = compose_config(
        tiny_overrides("data.val_classes=0.25", "~callbacks.model_checkpoint"), tmp_path
    )
    with pytest.raises(UserError, match="model_checkpoint"):
        build_trainer(cfg)
