"""Exact resume: 1 epoch + resume from last.ckpt to 2 epochs == 2 epochs straight (CPU);
a resume in the run's own folder appends to its CSV history."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from omegaconf import open_dict

from tests.conftest import compose_config, tiny_overrides
from vpt_dml.run import train


def run_tiny(tmp_path: Path, name: str, *extra: str) -> tuple[dict, dict]:
    cfg = compose_config(tiny_overrides(*extra), tmp_path)
    with open_dict(cfg):
        # one shared generated dataset, one run folder per run
        cfg.paths.data_dir = str(tmp_path.parent / "data")
        cfg.paths.output_dir = str(tmp_path / name)
        cfg.hydra.runtime.output_dir = cfg.paths.output_dir
    metrics = train(cfg)
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    return metrics, ckpt


def test_resume_equals_straight_run(tmp_path: Path) -> None:
    straight, straight_ckpt = run_tiny(tmp_path, "straight", "trainer.max_epochs=2")
    _, first_ckpt = run_tiny(tmp_path, "first", "trainer.max_epochs=1")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    resumed, resumed_ckpt = run_tiny(
        tmp_path, "resumed", "trainer.max_epochs=2", f"ckpt_path={last}"
    )

    assert resumed_ckpt["epoch"] == straight_ckpt["epoch"] == 1
    assert resumed_ckpt["global_step"] == straight_ckpt["global_step"]
    # the memory H moved during epoch 2, and identically in both runs
    memory = "proxies.memory"
    assert not torch.equal(first_ckpt["state_dict"][memory], straight_ckpt["state_dict"][memory])
    for key, value in straight_ckpt["state_dict"].items():
        torch.testing.assert_close(
            resumed_ckpt["state_dict"][key], value, rtol=0, atol=1e-6, msg=key
        )
    for a, b in zip(straight_ckpt["optimizer_states"], resumed_ckpt["optimizer_states"]):
        for pid, state in a["state"].items():
            for name, t in state.items():
                torch.testing.assert_close(b["state"][pid][name], t, rtol=0, atol=1e-6)
    assert straight_ckpt["lr_schedulers"] == resumed_ckpt["lr_schedulers"]
    assert straight.keys() == resumed.keys()
    for key, value in straight.items():
        assert abs(resumed[key] - value) <= 1e-6, key


def csv_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_resume_in_its_own_folder_appends_the_csv_history(tmp_path: Path) -> None:
    run_tiny(tmp_path, "run", "trainer.max_epochs=1", "eval_before_training=false")
    run_dir = tmp_path / "run"
    first = csv_rows(run_dir)

    def trained_epochs(rows: list[dict]) -> list[str]:
        return [r["epoch"] for r in rows if r.get("train/loss_epoch")]

    assert trained_epochs(first) == ["0"]
    last = run_dir / "checkpoints" / "last.ckpt"
    step = torch.load(last, weights_only=True)["global_step"]
    run_tiny(
        tmp_path, "run", "trainer.max_epochs=2", "eval_before_training=false", f"ckpt_path={last}"
    )
    after = csv_rows(run_dir)
    # every row up to the checkpoint is still there, in order and with its values; the
    # first run's final test (logged after its checkpoint) is replaced by the resumed one's
    kept = [r for r in first if int(r["step"]) < step]
    assert len(kept) < len(first) and len(after) > len(kept)
    for old, new in zip(kept, after):
        assert {k: v for k, v in new.items() if k in old} == old
    assert trained_epochs(after) == ["0", "1"]
    assert [r["epoch"] for r in after if r.get("test/recall@1")] == ["2"]
