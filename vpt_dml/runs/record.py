"""metrics.json: every evaluation of a run, which split chose the best epoch, what it cost.

Layout (all metric values are fractions in [0, 1]):

- `selection`: which split chose `best` - SELECTION_TEST when data.val_classes=0 (the
  paper's protocol: the best *test-set* epoch), SELECTION_HELD_OUT otherwise.
- `final`: the weights after the last training epoch. data.val_classes=0: the test stage
  run on them (split "test", every metric incl. NMI/F1). data.val_classes>0: their
  evaluation on the validation classes (split "validation classes"); the test split is
  not evaluated there, since it is evaluated once only, on the selected checkpoint.
- `best`: the epoch with the highest selection-split recall@1 (the first of equals, as
  ModelCheckpoint keeps it), its checkpoint, and the test-split metrics of that epoch:
  with data.val_classes=0 the validation run of that epoch (the test split; NMI/F1 only
  with eval.clustering_every_epoch=true, `not_computed` lists what is missing); with
  data.val_classes>0 the single test evaluation of the selected checkpoint, and
  `selection_metrics` the validation-class metrics that chose it.
- `before`: every metric of the evaluation before training (selection split).
- `metrics`: `final.metrics` plus `recall@1_before` (the flat layout older tools read).
- `test_evaluations`: how many times the test split was evaluated (every evaluation,
  whatever its stage, when data.val_classes=0; exactly 1 otherwise).
- `history`: every evaluation in order; `eval`: the schedule; `cost`; `provenance`.
- `embedding_health`: for `before`, `final` and `best`, the evaluated embeddings' rows,
  distinct rows and effective rank (evaluation/epoch.py defines them); `warnings`: why
  numbers may mean nothing (e.g. collapsed embeddings), also shown by summary.py. A
  collapsed run keeps "status": "finished": it finished, its numbers are what they are.
- `status`: a `Status`: "finished", "interrupted" (SIGTERM, or the SIGTERM watchdog:
  runs/sigterm.py), "diverged" (runs/callbacks/divergence.py) or "smoke test"
  (trainer.fast_dev_run). A file without one is an older finished run.

This module owns the file: `write_record` is the one writer (atomic: temporary file, fsync,
rename, for every status), `read_record` the one reader (one set of defaults), used by the
run, resume, sweep rerun, export, compare and report. How each way a run ends is turned
into a record: runs/outcome.py.
"""

from __future__ import annotations

import json
import os
import threading
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig

from vpt_dml.errors import UserError
from vpt_dml.evaluation import candidate_dtype_report
from vpt_dml.evaluation.health import collapsed
from vpt_dml.runs.durable import sync_folder
from vpt_dml.runs.provenance import environment

if TYPE_CHECKING:  # a Lightning callback: the readers of metrics.json need no Lightning
    from vpt_dml.runs.callbacks.metric_history import MetricHistory

METRICS_JSON = "metrics.json"


class Status(str, Enum):
    """How a run ended, as metrics.json's "status" says it."""

    FINISHED = "finished"
    INTERRUPTED = "interrupted"  # SIGTERM (by the run, or by its watchdog)
    DIVERGED = "diverged"
    SMOKE_TEST = "smoke test"  # trainer.fast_dev_run: nothing to compare

    def __str__(self) -> str:
        return self.value


class RecordUnreadable(UserError):
    """metrics.json exists but is not a JSON object; `detail` says why (each tool words the fix)."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(f"{path} is not valid JSON ({detail})")
        self.path, self.detail = path, detail


def record_path(folder_or_file: str | Path) -> Path:
    """A run folder's metrics.json (a path to the file itself is taken as it is)."""
    path = Path(folder_or_file)
    return path if path.name == METRICS_JSON or path.suffix == ".json" else path / METRICS_JSON


def has_record(folder: str | Path) -> bool:
    return record_path(folder).is_file()


def write_record(folder: str | Path, result: dict) -> Path:
    """THE writer of metrics.json: a temporary file beside it, fsynced, renamed over it, the
    folder fsynced, so a reader (a sweep rerun, report) sees the old file or the new one,
    never a part. Every status goes through here (finished, interrupted, diverged, the
    watchdog's)."""
    path = record_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    # per process and thread: the SIGTERM watchdog may write while the run does
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    sync_folder(path.parent)
    return path


def read_record(folder_or_file: str | Path) -> dict | None:
    """THE reader of metrics.json: None when there is none; `RecordUnreadable` when it is
    not a JSON object. Defaults of older files: "status" finished, "metrics" {}."""
    path = record_path(folder_or_file)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RecordUnreadable(path, e.strerror or str(e)) from None
    try:
        result = json.loads(text)
    except ValueError as e:
        raise RecordUnreadable(path, getattr(e, "msg", str(e))) from None
    if not isinstance(result, dict):
        raise RecordUnreadable(path, "not a JSON object")
    result.setdefault("status", Status.FINISHED.value)
    if not isinstance(result.get("metrics"), dict):
        result["metrics"] = {}
    return result


def status_of(folder: str | Path) -> str | None:
    """The recorded run's status; None without metrics.json, "unreadable" for a broken one."""
    try:
        result = read_record(folder)
    except RecordUnreadable:
        return "unreadable"
    return None if result is None else str(result["status"])


def saved_recall(folder: str | Path) -> float | None:
    """The recorded run's recall@1 (what a finished sweep job returned), None if absent."""
    try:
        value = (read_record(folder) or {}).get("metrics", {}).get("recall@1")
    except RecordUnreadable:
        return None
    return float(value) if isinstance(value, (int, float)) else None


SELECTION_TEST = "test split (as the paper; not a held-out protocol)"
SELECTION_HELD_OUT = "validation classes (held out)"
TEST = "test"
VALIDATION = "validation classes"


def build_result(
    history: MetricHistory,
    *,
    held_out: bool,
    last_epoch: int,
    best_checkpoint: str | None,
    schedule: dict,
    cost: dict,
    provenance: dict,
    status: Status = Status.FINISHED,
) -> dict:
    """`held_out`: data.val_classes>0 (then the only test record is the selected
    checkpoint's); `last_epoch`: the last trained epoch (0-based)."""
    val_split = VALIDATION if held_out else TEST
    before = history.last("before")
    test = history.last("test")
    chosen = history.best("val")

    if held_out:
        last_val = history.last("val")
        final = (
            {"epoch": last_val["epoch"], "split": VALIDATION, "metrics": last_val["metrics"]}
            if last_val
            else None
        )
    else:
        final = {"epoch": last_epoch, "split": TEST, "metrics": test["metrics"] if test else {}}

    best = None
    if chosen is not None:
        best = {
            "epoch": chosen["epoch"],
            "split": TEST,
            "selected_on": val_split,
            "selected_by": "recall@1 (highest; first of equals)",
            "checkpoint": best_checkpoint,
        }
        if held_out:
            best["metrics"] = test["metrics"] if test else {}
            best["selection_metrics"] = chosen["metrics"]
        else:
            best["metrics"] = chosen["metrics"]
            missing = sorted(set(final["metrics"]) - set(chosen["metrics"]))
            if missing:
                best["not_computed"] = missing
                best["note"] = (
                    "validation runs compute no clustering metrics; "
                    "eval.clustering_every_epoch=true adds them"
                )

    metrics = dict(final["metrics"]) if final else {}
    if before and "recall@1" in before["metrics"]:
        metrics["recall@1_before"] = before["metrics"]["recall@1"]

    def split_of(record: dict) -> str:
        return TEST if record["stage"] == "test" else val_split

    # the test stage ran on the selected checkpoint (held out) or on the final weights
    tested_epoch = (best or {}).get("epoch") if held_out else last_epoch

    def epoch_of(record: dict) -> int | None:
        return tested_epoch if record["stage"] == "test" else record["epoch"]

    return {
        "status": str(status),
        "selection": SELECTION_HELD_OUT if held_out else SELECTION_TEST,
        "metrics": metrics,
        "final": final,
        "best": best,
        "before": {"split": val_split, "metrics": before["metrics"]} if before else None,
        "test_evaluations": sum(split_of(r) == TEST for r in history.records),
        "eval": {
            **schedule,
            "evaluated_epochs": [r["epoch"] for r in history.stage("val")],
        },
        "cost": cost,
        "history": [
            {
                "stage": r["stage"],
                "epoch": epoch_of(r),
                "split": split_of(r),
                "metrics": r["metrics"],
            }
            for r in history.records
        ],
        "provenance": provenance,
    }


def add_embedding_health(result: dict, log: list[dict]) -> None:
    """`embedding_health` per section of `result`, and a warning per collapsed one."""

    def last(stage: str, epoch=None, any_epoch: bool = False) -> dict | None:
        found = [r for r in log if r["stage"] == stage and (any_epoch or r["epoch"] == epoch)]
        return found[-1] if found else None

    held_out = result.get("selection") == SELECTION_HELD_OUT
    final, best = result.get("final"), result.get("best")
    records = {"before": last("before", any_epoch=True)}
    if final:
        records["final"] = last("val", final["epoch"]) if held_out else last("test")
    if best:
        records["best"] = last("test") if held_out else last("val", best["epoch"])
    section = {}
    for name, record in records.items():
        if record is None:
            continue
        part = result.get(name) or {}
        health = {k: v for k, v in record.items() if k not in ("stage", "epoch")}
        section[name] = {"epoch": part.get("epoch"), "split": part.get("split"), **health}
    if not section:
        return
    result["embedding_health"] = section
    for name, health in section.items():
        why = collapsed(health)
        if why:
            epoch = f", epoch {health['epoch']}" if health["epoch"] is not None else ""
            result.setdefault("warnings", []).append(
                f"{name} ({health['split']}{epoch}): the embeddings collapsed ({why}): its "
                "retrieval metrics rank ties, not learned similarity, and mean nothing; "
                "lower optim.lr or check the data"
            )


def run_provenance(cfg, trainer, module, dm, backbone: dict) -> dict:
    """How the numbers were produced: code, seed, overrides, data as verified, weights."""
    return {
        **environment(),
        "seed": cfg.get("seed"),
        "task_name": cfg.get("task_name"),
        "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
        "dataset": {"name": dm.name, "root": str(dm.root), **dm.count_report},
        "backbone": backbone,
        "parameters": getattr(module, "parameter_summary", None),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "world_size": trainer.world_size,
        # the exact search's fast pass: bf16 only on CPUs with native bf16 matrix units
        "eval_candidates": candidate_dtype_report(trainer.strategy.root_device),
    }
