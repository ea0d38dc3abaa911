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
run, resume, sweep rerun, export, compare and report.
"""

from __future__ import annotations

import json
import os
import threading
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vpt_dml.errors import Diverged, UserError
from vpt_dml.evaluation import candidate_dtype_report, per_query
from vpt_dml.evaluation.health import collapsed
from vpt_dml.evaluation.protocol import protocol
from vpt_dml.models.backbone import built_report, weights_report
from vpt_dml.models.method_summary import effective_method
from vpt_dml.runs.callbacks.metric_history import MetricHistory
from vpt_dml.runs.provenance import environment
from vpt_dml.runs.resume import ResumePlan, warn_uncompared
from vpt_dml.runs.summary import print_summary

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
    try:  # the rename itself survives a power cut (POSIX: fsync the directory)
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
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


def backbone_provenance(b: DictConfig, vit=None) -> dict:
    """Which backbone, and where its weights came from (file size, SHA-256, key counts)."""
    out = {
        "name": b.name,
        "pretrained": bool(b.pretrained or b.weights),
        "weights": b.weights or ("timm hub" if b.pretrained else "random init"),
    }
    if b.get("synthetic_pretraining") and b.weights:
        out["made_by"] = "vpt_dml synthetic pretraining on generated classes outside the dataset"
    if vit is not None and weights_report(vit) is not None:
        out["weights_file"] = weights_report(vit)
    if vit is not None:  # what was built, read off the model (not the config)
        out["built"] = built_report(vit)
    return out


def provenance_of(cfg: DictConfig, module) -> dict:
    return backbone_provenance(cfg.model.backbone, module.embedder.backbone.vit)


def record_resume(result: dict, plan: ResumePlan | None) -> None:
    if plan is None:
        return
    result["resume"] = plan.record()
    if not plan.compared:
        result.setdefault("warnings", []).append(warn_uncompared(plan))


def record_finished(
    cfg: DictConfig, built: Any, callbacks: Any, plan: ResumePlan | None = None
) -> dict:
    """metrics.json of a run that trained and tested (`built`: train.Built, `callbacks`:
    runs/trainer.RunCallbacks); prints the summary; returns the flat metrics."""
    trainer, module, dm = built.trainer, built.module, built.datamodule
    out_dir = Path(cfg.paths.output_dir)
    held_out = bool(dm.val_classes)
    result = build_result(
        callbacks.history,
        held_out=held_out,
        last_epoch=built.last_epoch,
        best_checkpoint=callbacks.best_checkpoint(),
        schedule=callbacks.schedule_record(),
        cost=callbacks.cost.summary(module),
        provenance=run_provenance(cfg, trainer, module, dm, provenance_of(cfg, module)),
    )
    # what actually trained, read from the built model rather than the config's names
    result["method"] = effective_method(module)
    add_embedding_health(result, module.embedding_health_log)  # and a warning if collapsed
    record_resume(result, plan)
    if trainer.fast_dev_run:  # Lightning's smoke test: a batch or a few, nothing to compare
        batches = 1 if trainer.fast_dev_run is True else int(trainer.fast_dev_run)
        result["status"] = str(Status.SMOKE_TEST)
        result.setdefault("warnings", []).append(
            f"trainer.fast_dev_run: {batches} batch(es) per stage and no checkpoints; the "
            "numbers only show that the pipeline runs"
        )
    result["protocol"] = protocol(dm, result)
    if trainer.is_global_zero:
        if module.per_query_dir is not None:  # the selected epoch's table becomes test_best
            best_epoch = None if held_out else (result.get("best") or {}).get("epoch")
            result["per_query"] = per_query.finalize(out_dir, best_epoch)
        write_record(out_dir, result)
        print_summary(result, out_dir)
    return result["metrics"]


def record_interrupted(
    cfg: DictConfig, built: Any, callbacks: Any, plan: ResumePlan | None = None
) -> str:
    """metrics.json of a run stopped by SIGTERM; returns the line that says what is left."""
    trainer, module, dm = built.trainer, built.module, built.datamodule
    info = dict(callbacks.resume.interrupted or {"signal": "SIGTERM"})
    # what was logged so far (val/..., train/...): no test metrics exist yet
    metrics = {
        k: float(v)
        for k, v in trainer.callback_metrics.items()
        if isinstance(v, torch.Tensor) and v.numel() == 1
    }
    before = built.before
    first = before.get("before/recall@1", before.get("val/recall@1"))
    kept = callbacks.history.last("before") if first is None else None  # a resume's
    if kept is not None:
        first = kept["metrics"].get("recall@1")
    if first is not None:
        metrics["recall@1_before"] = float(first)
    result = {
        "status": str(Status.INTERRUPTED),
        "interrupted": info,
        "metrics": metrics,
        "provenance": run_provenance(cfg, trainer, module, dm, provenance_of(cfg, module)),
    }
    record_resume(result, plan)
    if not trainer.is_global_zero:
        return f"[rank {trainer.global_rank}] stopped by SIGTERM; rank 0 says what was saved"
    write_record(cfg.paths.output_dir, result)
    ckpt = info.get("checkpoint")
    saved = (
        f"{info.get('note')}; resume with ckpt_path={ckpt}"
        if ckpt and Path(ckpt).is_file()
        else "no checkpoint was saved"
    )
    done = info.get("completed_epochs", trainer.current_epoch)
    return f'SIGTERM after {done} completed epoch(s): {saved}; metrics.json says "status": "interrupted"'


def write_diverged(
    error: Diverged, cfg: DictConfig, built: Any, callbacks: Any, provenance: dict
) -> dict:
    """metrics.json of a diverged run: the finite evaluations before it, no final metrics."""
    trainer, module = built.trainer, built.module
    result = build_result(
        callbacks.history,
        held_out=bool(built.datamodule.val_classes),
        last_epoch=error.info.get("checkpoint_epoch", trainer.current_epoch - 1),
        best_checkpoint=callbacks.best_checkpoint(),
        schedule=callbacks.schedule_record(),
        cost=callbacks.cost.summary(module),
        provenance=provenance,
        status=Status.DIVERGED,
    )
    result["final"] = None  # the final weights are not finite
    result["metrics"] = {k: v for k, v in result["metrics"].items() if k.endswith("_before")}
    result["diverged"] = {**error.info, "message": str(error)}
    result.setdefault("warnings", []).append(f"training diverged: {error}")
    add_embedding_health(result, getattr(module, "embedding_health_log", []))
    if trainer.is_global_zero:
        write_record(cfg.paths.output_dir, result)
    return result
