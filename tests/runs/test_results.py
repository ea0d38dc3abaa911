"""metrics.json against the run's own CSV log: best, final, before, test count, cost."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict
from rich.console import Console

from tests.conftest import compose_config, tiny_overrides
from vpt_dml.models.backbone import data_config
from vpt_dml.run import train
from vpt_dml.runs.record import SELECTION_HELD_OUT, SELECTION_TEST
from vpt_dml.runs.summary import metric_table
from vpt_dml.train import build_datamodule, build_module


def run_tiny(tmp_path: Path, *extra: str):
    cfg = compose_config(tiny_overrides(*extra), tmp_path)
    train(cfg)
    out = Path(cfg.paths.output_dir)
    return (
        cfg,
        json.loads((out / "metrics.json").read_text()),
        read_csv(out / "csv" / "metrics.csv"),
    )


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def logged(row: dict, prefix: str) -> dict[str, float]:
    return {k[len(prefix) :]: float(v) for k, v in row.items() if k.startswith(prefix) and v}


def evaluations(rows: list[dict]) -> tuple[dict | None, list[tuple[int, dict]], list[dict]]:
    """(before, [(epoch, val metrics)], [test metrics]) as the CSV logger wrote them."""
    before = [logged(r, "before/") for r in rows if logged(r, "before/")]
    val = [(int(r["epoch"]), logged(r, "val/")) for r in rows if logged(r, "val/")]
    test = [logged(r, "test/") for r in rows if logged(r, "test/")]
    if not before and val and int(rows[0]["step"] or 0) == 0:
        # a module that logs the evaluation before training under val/: the first row
        before = [val.pop(0)[1]]
    return (before[0] if before else None), val, test


# the whole tiny ViT trained at a high lr: its epochs' Recall@1 differ, so a wrong choice
# of the best epoch (lowest, last of equal) shows in these runs
MOVING = ("model/peft=full", "optim.lr=0.01")


def first_best(val: list[tuple[int, dict]]) -> tuple[int, dict]:
    recalls = [m["recall@1"] for _, m in val]
    assert max(recalls) > min(recalls), f"every epoch scored {recalls}: nothing to choose from"
    best = val[0]
    for epoch, m in val[1:]:
        if m["recall@1"] > best[1]["recall@1"]:
            best = (epoch, m)
    return best


def assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_test_split_selection_matches_the_csv_and_cost_is_consistent(tmp_path):
    warmup = 3  # = steps per epoch: epoch 0 is all warm-up
    cfg, result, rows = run_tiny(
        tmp_path, "trainer.max_epochs=3", f"callbacks.cost.warmup_steps={warmup}", *MOVING
    )
    before, val, test = evaluations(rows)
    assert result["status"] == "finished"
    assert result["selection"] == SELECTION_TEST
    assert [e for e, _ in val] == [0, 1, 2]

    best_epoch, best_metrics = first_best(val)
    assert result["best"]["epoch"] == best_epoch
    assert result["best"]["split"] == "test" and result["best"]["selected_on"] == "test"
    assert_same(result["best"]["metrics"], best_metrics)
    assert torch.load(result["best"]["checkpoint"], weights_only=False)["epoch"] == best_epoch

    # final: the test stage on the last epoch's weights = that epoch's validation (same
    # split, same weights) plus the clustering metrics
    assert result["final"]["epoch"] == 2 and result["final"]["split"] == "test"
    assert len(test) == 1
    assert_same(result["final"]["metrics"], test[0])
    assert [r["epoch"] for r in result["history"] if r["stage"] == "test"] == [2]
    assert_same({k: result["final"]["metrics"][k] for k in val[-1][1]}, val[-1][1])
    assert_same(result["before"]["metrics"], before)
    assert_same(
        result["metrics"], {**result["final"]["metrics"], "recall@1_before": before["recall@1"]}
    )
    # before + 3 validations + the test stage, all on the test split
    assert result["test_evaluations"] == 5

    # cost: per-epoch rows in the CSV, and images/s that agrees with them
    cost = result["cost"]
    for key in ("train_images_per_s", "train_epoch_s", "eval_s", "peak_memory_mib"):
        assert cost[key] > 0, key
    assert cost["trainable_params"] == result["provenance"]["parameters"]["all"]["trainable"] > 0
    assert cost["warmup_steps_excluded"] == warmup
    per_epoch = {int(r["epoch"]): logged(r, "cost/") for r in rows if logged(r, "cost/")}
    assert sorted(per_epoch) == [0, 1, 2]
    batch = cfg.data.batch_size
    assert all(c["train_images"] == 3 * batch for c in per_epoch.values())
    assert "train_images_per_s" not in per_epoch[0]  # all warm-up
    images = sum(per_epoch[e]["train_images"] for e in (1, 2))
    seconds = sum(per_epoch[e]["train_epoch_s"] for e in (1, 2))
    assert cost["train_images_per_s"] == pytest.approx(images / seconds, rel=0.2)


def fresh_test(cfg, checkpoint: str) -> dict[str, float]:
    """The test split evaluated on `checkpoint` by a new trainer, outside the run."""
    dm = build_datamodule(cfg)
    splits = dm.load()
    module = build_module(cfg, splits.train.num_classes, dm.recall_ks)
    pre = data_config(module.embedder.backbone.vit)
    dm.image_size, dm.mean, dm.std = pre["image_size"], pre["mean"], pre["std"]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    out = trainer.test(module, datamodule=dm, ckpt_path=checkpoint, verbose=False)[0]
    return {k.removeprefix("test/"): float(v) for k, v in out.items()}


def test_held_out_selection_tests_the_selected_checkpoint_once(tmp_path):
    # 12 classes: 6 train, of which 2 are held out for validation; 6 test classes
    cfg, result, rows = run_tiny(
        tmp_path,
        "trainer.max_epochs=3",
        "data.synthetic.num_classes=12",
        "data.val_classes=0.34",
        *MOVING,
    )
    assert result["provenance"]["dataset"]["counts"]["test_classes"] == 6
    before, val, test = evaluations(rows)
    assert result["selection"] == SELECTION_HELD_OUT
    assert result["test_evaluations"] == 1
    assert len(test) == 1
    assert sum(r["stage"] == "test" for r in result["history"]) == 1

    best_epoch, selection = first_best(val)
    assert [r["epoch"] for r in result["history"] if r["stage"] == "test"] == [best_epoch]
    best = result["best"]
    assert best["epoch"] == best_epoch and best["selected_on"] == "validation classes"
    assert_same(best["selection_metrics"], selection)
    assert_same(best["metrics"], test[0])
    assert torch.load(best["checkpoint"], weights_only=False)["epoch"] == best_epoch
    # the test metrics are those of the selected checkpoint
    assert_same(best["metrics"], fresh_test(cfg, best["checkpoint"]))

    # final: the last epoch on the validation classes; the flat metrics equal it
    assert result["final"]["epoch"] == 2 and result["final"]["split"] == "validation classes"
    assert_same(result["final"]["metrics"], val[-1][1])
    assert_same(
        result["metrics"], {**result["final"]["metrics"], "recall@1_before": before["recall@1"]}
    )
    assert result["before"]["split"] == "validation classes"
    assert_same(result["before"]["metrics"], before)
    assert result["cost"]["train_images_per_s"] > 0 and result["cost"]["eval_s"] > 0


def test_summary_shows_before_final_and_best_side_by_side():
    result = {
        "selection": SELECTION_TEST,
        "provenance": {"task_name": "t", "dataset": {"name": "d"}, "backbone": {"name": "b"}},
        "before": {"split": "test", "metrics": {"recall@1": 0.1}},
        "final": {"epoch": 4, "split": "test", "metrics": {"recall@1": 0.5, "nmi": 0.3}},
        "best": {"epoch": 2, "split": "test", "metrics": {"recall@1": 0.6}},
    }
    console = Console(width=120, record=True, file=io.StringIO())
    console.print(metric_table(result))
    lines = console.export_text().splitlines()
    header = next(line for line in lines if "before" in line)
    assert header.index("before") < header.index("final epoch 4") < header.index("best epoch 2")
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in lines if "│" in line]
    rows = {c[0]: c[1:] for c in cells if c[0] in ("recall@1", "nmi")}
    assert rows == {"recall@1": ["10.00", "50.00", "60.00"], "nmi": ["-", "30.00", "-"]}


def test_metrics_json_of_a_resumed_run_keeps_the_earlier_epochs(tmp_path):
    first = tmp_path / "first"
    cfg = compose_config(tiny_overrides("trainer.max_epochs=1"), first)
    train(cfg)
    last = first / "run" / "checkpoints" / "last.ckpt"
    second = tmp_path / "second"
    cfg = compose_config(tiny_overrides("trainer.max_epochs=2", f"ckpt_path={last}"), second)
    with open_dict(cfg):
        cfg.paths.data_dir = str(first / "data")
    train(cfg)
    result = json.loads((second / "run" / "metrics.json").read_text())
    assert [r["epoch"] for r in result["history"] if r["stage"] == "val"] == [0, 1]
    assert result["cost"]["train_epochs_timed"] == 2
