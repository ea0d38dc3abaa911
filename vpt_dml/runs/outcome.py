"""How a run's end becomes its record: metrics.json of a finished, an interrupted (SIGTERM)
and a diverged run, built from the recipe's parts (train.Built) and the run's callbacks
(runs/trainer.RunCallbacks), and written through runs/record.py's one writer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from vpt_dml.errors import Diverged
from vpt_dml.evaluation import per_query
from vpt_dml.evaluation.protocol import protocol
from vpt_dml.models.backbone import built_report
from vpt_dml.models.method_summary import effective_method
from vpt_dml.models.weights import weights_report
from vpt_dml.runs.record import (
    Status,
    add_embedding_health,
    build_result,
    run_provenance,
    write_record,
)
from vpt_dml.runs.resume import ResumePlan, warn_uncompared
from vpt_dml.runs.summary import print_summary


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
