"""Evaluation cadence: `eval.start_epoch` and `eval.every_n_epochs`; the final epoch always.

The reference evaluates the test split only from a start epoch on (METHOD.md §5). Lightning
has no start epoch, and its `check_val_every_n_epoch` would skip the final epoch, so this
callback switches the validation loop off for the epochs it skips (limit_val_batches=0
for that epoch) and back on for the others. Nothing is stored: the decision depends on the
epoch number only, so a resumed run skips the same epochs as a straight one.

Checkpoints: both ModelCheckpoints keep saving at every training epoch end (last.ckpt every
epoch). On a skipped epoch before any validation, the best-checkpoint callback finds no
`val/recall@1`, warns and saves nothing; after a validation its stale value is never
better than itself, so nothing is saved either (with the default save_top_k=1).
"""

from __future__ import annotations

import math
import warnings

import lightning as L

from vpt_dml.errors import UserError

# Lightning warns once per skipped epoch before the first validation that the monitored
# key is missing; that is this schedule working. A misspelt monitor still raises at the
# first evaluated epoch (Lightning raises once validation has run).
_MISSING_MONITOR = r".*could not find the monitored key in the returned metrics.*"


def evaluated(epoch: int, start_epoch: int, every_n_epochs: int, last: bool) -> bool:
    """Whether epoch `epoch` (0-based) is evaluated."""
    if last:
        return True
    return epoch >= start_epoch and (epoch - start_epoch) % every_n_epochs == 0


class EvalSchedule(L.Callback):
    def __init__(self, start_epoch: int = 0, every_n_epochs: int = 1) -> None:
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise UserError(f"eval.start_epoch={start_epoch!r} must be an integer >= 0")
        if (
            isinstance(every_n_epochs, bool)
            or not isinstance(every_n_epochs, int)
            or every_n_epochs < 1
        ):
            raise UserError(f"eval.every_n_epochs={every_n_epochs!r} must be an integer >= 1")
        self.start_epoch = start_epoch
        self.every_n_epochs = every_n_epochs
        self._limit: int | float | None = None
        if start_epoch > 0 or every_n_epochs > 1:
            warnings.filterwarnings("ignore", message=_MISSING_MONITOR)

    def is_last_epoch(self, trainer: L.Trainer) -> bool:
        epoch = trainer.current_epoch
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            if epoch >= trainer.max_epochs - 1:
                return True
        if trainer.max_steps is not None and trainer.max_steps > 0:
            per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
            if trainer.global_step + per_epoch >= trainer.max_steps:
                return True
        return False

    def should_evaluate(self, trainer: L.Trainer) -> bool:
        return evaluated(
            trainer.current_epoch,
            self.start_epoch,
            self.every_n_epochs,
            self.is_last_epoch(trainer),
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._limit = trainer.limit_val_batches

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._limit is None:
            return
        trainer.limit_val_batches = self._limit if self.should_evaluate(trainer) else 0

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        self._restore(trainer)

    def _restore(self, trainer: L.Trainer) -> None:
        # a later trainer.validate/test on the same trainer sees the user's limit again
        if self._limit is not None:
            trainer.limit_val_batches = self._limit
            self._limit = None
