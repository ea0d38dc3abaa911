"""Stop a diverged run at the step it diverged, keep the last finite checkpoint, say so.

`DivergenceGuard` checks after every training step that the loss and the trainable weights
are finite (one host sync per step). Under trainer.precision=16-mixed the GradScaler skips a
step whose gradients overflow and lowers its scale, so a non-finite *loss* stops the run
only after FP16_PATIENCE consecutive such steps (the scaler did not recover); non-finite
*weights* stop any run at once. Raising here, mid-epoch, means no checkpoint of the broken
weights is ever written: `last.ckpt` stays the last finite epoch's (and
vpt_dml/checkpoint_io.py refuses to write a non-finite state, the last line of defence).
Non-finite evaluation embeddings (evaluation/epoch.py) raise the same `Diverged`.

vpt_dml.run then writes metrics.json with "status": "diverged" (`write_diverged`), prints
one `diverged:` line naming the step and the precision, and exits with DIVERGED_EXIT (3):
not 2 (bad input) nor 1 (a crash), so a sweep's scheduler can tell the three apart.
Under DDP the loss is computed on the global batch and the weights are identical, so every
rank raises at the same step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

DIVERGED_EXIT = 3
FP16_PATIENCE = 5
# precisions with a GradScaler, which skips overflowing steps by itself
SCALED = {"16-mixed", "16"}


class Diverged(Exception):
    """Training produced NaN / inf; the message is the one line to print, `info` goes to
    metrics.json."""

    def __init__(self, message: str, info: dict | None = None) -> None:
        super().__init__(message)
        self.info = dict(info or {})


def precision_of(trainer) -> str:
    return str(getattr(trainer, "precision", "32-true"))


def _cause(precision: str) -> str:
    if precision in SCALED or precision.startswith("16"):
        return "fp16 overflow or diverging weights"
    return f"the weights diverged in {precision} arithmetic"


def _non_finite(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def non_finite_embeddings(emb: torch.Tensor, trainer, stage: str) -> None:
    """Raise Diverged when an evaluation's embeddings hold NaN or inf."""
    if bool(torch.isfinite(emb).all()):
        return
    precision = precision_of(trainer)
    fitting = getattr(trainer.state, "fn", None) == "fit"
    if fitting:
        where = f"the evaluation after epoch {trainer.current_epoch}"
    elif stage == "test":
        where = "the test evaluation"
    else:
        where = "the evaluation before training"
    raise Diverged(
        f"{where} gave NaN/inf embeddings under trainer.precision={precision}: "
        f"{_cause(precision)}; lower optim.lr, or check the weights given",
        {"stage": stage, "epoch": trainer.current_epoch, "precision": precision},
    )


def patience(precision: str) -> int:
    """Consecutive non-finite losses that stop the run."""
    return FP16_PATIENCE if precision in SCALED else 1


class DivergenceGuard(L.Callback):
    """`checkpoint`: the run's last.ckpt (named in the message: what is left to resume)."""

    def __init__(self, checkpoint: str | Path | None = None) -> None:
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.streak = 0
        self._first: dict | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        weights = [p for p in pl_module.parameters() if p.requires_grad]
        checks = [torch.isfinite(p).all() for p in weights]
        if loss is not None:
            checks.append(torch.isfinite(loss.detach()).all())
        flags = torch.stack(checks).tolist() if checks else []  # one host sync
        loss_ok = loss is None or flags[-1]
        weights_ok = all(flags[: len(weights)])
        if loss_ok and weights_ok:
            self.streak = 0
            return
        precision = precision_of(trainer)
        step = trainer.global_step  # optimizer steps so far, this one included
        if not loss_ok:
            self.streak += 1
            if self.streak == 1:
                self._first = {"step": step, "epoch": trainer.current_epoch, "batch": batch_idx}
            if weights_ok and self.streak < patience(precision):
                return  # the scaler skipped the step; it may recover
        where = self._first if not loss_ok else None
        where = where or {"step": step, "epoch": trainer.current_epoch, "batch": batch_idx}
        what = (
            f"the training loss was {_non_finite(float(loss))}"
            if not loss_ok
            else "the weights became NaN/inf"
        )
        if not loss_ok and self.streak > 1:
            what += f" for {self.streak} consecutive steps (the fp16 grad scaler did not recover)"
        lrs = sorted({g["lr"] for opt in trainer.optimizers for g in opt.param_groups})
        info = {
            **where,
            "precision": precision,
            "consecutive_steps": self.streak,
            "reason": "loss" if not loss_ok else "weights",
            "lr": lrs,
            **self._kept(),
        }
        kept = (
            f"{self.checkpoint} holds epoch {info['checkpoint_epoch']}, the last finite one"
            if info.get("checkpoint")
            else "no checkpoint was written (no epoch had ended)"
        )
        raise Diverged(
            f"{what} at step {where['step']} (epoch {where['epoch']}, batch {where['batch']}) "
            f"under trainer.precision={precision}: {_cause(precision)}; stopped there: "
            f"{kept}; lower optim.lr (now {', '.join(f'{lr:g}' for lr in lrs)})",
            info,
        )

    def _kept(self) -> dict:
        if self.checkpoint is None or not self.checkpoint.is_file():
            return {"checkpoint": None}
        from vpt_dml.checkpoints import load_checkpoint

        return {
            "checkpoint": str(self.checkpoint),
            "checkpoint_epoch": int(load_checkpoint(self.checkpoint).get("epoch", -1)),
        }


def write_diverged(
    error: Diverged, trainer, module, out_dir: Path, held_out: bool, provenance: dict
) -> dict:
    """metrics.json of a diverged run: the finite evaluations before it, no final metrics."""
    from vpt_dml.callbacks.cost import CostMonitor
    from vpt_dml.callbacks.eval_schedule import EvalSchedule
    from vpt_dml.callbacks.metric_history import MetricHistory
    from vpt_dml.results import add_embedding_health, build_result

    def find(kind):
        return next((c for c in trainer.callbacks if isinstance(c, kind)), None)

    history, cost, schedule = find(MetricHistory), find(CostMonitor), find(EvalSchedule)
    if history is None:
        history = MetricHistory()
    selector = next(
        (
            c
            for c in trainer.callbacks
            if isinstance(c, ModelCheckpoint) and c.monitor == "val/recall@1" and c.mode == "max"
        ),
        None,
    )
    result = build_result(
        history,
        held_out=held_out,
        last_epoch=error.info.get("checkpoint_epoch", trainer.current_epoch - 1),
        best_checkpoint=(selector.best_model_path or None) if selector else None,
        schedule=(
            {"start_epoch": schedule.start_epoch, "every_n_epochs": schedule.every_n_epochs}
            if schedule
            else {}
        ),
        cost=cost.summary(module) if cost else {},
        provenance=provenance,
        status="diverged",
    )
    result["final"] = None  # the final weights are not finite
    result["metrics"] = {k: v for k, v in result["metrics"].items() if k.endswith("_before")}
    result["diverged"] = {**error.info, "message": str(error)}
    result.setdefault("warnings", []).append(f"training diverged: {error}")
    add_embedding_health(result, getattr(module, "embedding_health_log", []))
    if trainer.is_global_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
