"""Stop a diverged run at the step it diverged, keep the last finite checkpoint, say so.

`DivergenceGuard` checks after every training step that the loss and the trainable weights
are finite (one host sync per step). Under trainer.precision=16-mixed the GradScaler skips a
step whose gradients overflow and lowers its scale, so a non-finite *loss* stops the run
only after FP16_PATIENCE consecutive such steps (the scaler did not recover); non-finite
*weights* stop any run at once. Raising here, mid-epoch, means no checkpoint of the broken
weights is ever written: `last.ckpt` stays the last finite epoch's (and
vpt_dml/runs/checkpoint_io.py refuses to write a non-finite state, the last line of defence).
Non-finite evaluation embeddings (evaluation/health.py) raise the same `Diverged` (vpt_dml/errors.py).

vpt_dml.run then writes metrics.json with "status": "diverged" (runs/record.py `write_diverged`), prints
one `diverged:` line naming the step and the precision, and exits with DIVERGED_EXIT (3):
not 2 (bad input) nor 1 (a crash), so a sweep's scheduler can tell the three apart.
Under DDP the loss is computed on the global batch and the weights are identical, so every
rank raises at the same step.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from vpt_dml.checkpoints import load_checkpoint
from vpt_dml.errors import Diverged
from vpt_dml.evaluation.health import SCALED, _cause, _non_finite, precision_of

DIVERGED_EXIT = 3
FP16_PATIENCE = 5


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
        return {
            "checkpoint": str(self.checkpoint),
            "checkpoint_epoch": int(load_checkpoint(self.checkpoint).get("epoch", -1)),
        }
