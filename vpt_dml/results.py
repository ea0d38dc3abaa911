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
- `status`: "finished", "interrupted" (SIGTERM) or "diverged" (callbacks/divergence.py).
"""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig

from vpt_dml.callbacks.metric_history import MetricHistory
from vpt_dml.evaluation import candidate_dtype_report
from vpt_dml.evaluation.epoch import collapsed
from vpt_dml.provenance import environment

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
    status: str = "finished",
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
        "status": status,
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
