"""logger=wandb offline on the demo data; a failing W&B never stops training."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.conftest import compose_config, tiny_overrides
from vpt_dml.run import train
from vpt_dml.runs.callbacks.wandb_logger import finish_wandb


def test_offline_run_leaves_metrics_and_images(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_config(tiny_overrides("logger=wandb", "eval_before_training=false"), tmp_path)
    try:
        train(cfg)
    finally:
        finish_wandb()
    run = Path(cfg.paths.output_dir)
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
    assert "train/loss_epoch" in (run / "csv" / "metrics.csv").read_text()
    for name in ("retrieval_gallery.png", "recall_at_k.png"):
        assert (run / "images" / name).read_bytes()[:4] == b"\x89PNG"


def test_failing_wandb_init_warns_and_training_goes_on(tmp_path: Path, monkeypatch, caplog) -> None:
    wandb = pytest.importorskip("wandb")

    def broken_init(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    cfg = compose_config(tiny_overrides("logger=wandb", "eval_before_training=false"), tmp_path)
    with caplog.at_level(logging.WARNING, logger="vpt_dml"):
        metrics = train(cfg)
    assert "recall@1" in metrics
    assert any("W&B could not start" in r.getMessage() for r in caplog.records)
    run = Path(cfg.paths.output_dir)
    assert (run / "metrics.json").is_file() and "train/loss" in (
        run / "csv" / "metrics.csv"
    ).read_text()


def test_a_wandb_run_starts_without_the_anonymous_deprecation_warning(
    tmp_path: Path, monkeypatch, capfd
) -> None:
    """Issue 28 item 16: Lightning passed anonymous=None to wandb.init and wandb warned
    "The anonymous setting has no effect" on every logger=wandb run."""
    pytest.importorskip("wandb")
    from vpt_dml.runs.callbacks.wandb_logger import wandb_logger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    try:
        logger = wandb_logger(save_dir=str(tmp_path), project="vpt_dml", name="t")
        assert logger is not None and logger.experiment is not None
    finally:
        finish_wandb()
    out, err = capfd.readouterr()
    assert "anonymous" not in (out + err).lower(), err[-2000:]
