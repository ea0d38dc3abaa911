"""Every evaluation of a run, in order: before training, each validated epoch, test.

Read from `trainer.callback_metrics` once an evaluation has finished (the module logs
"<label>/<metric>"). Saved in every checkpoint, so a resumed run still knows the epochs
evaluated before it started; metrics.json's `best`, `final` and `before` come from here.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn


def metrics_with_prefix(callback_metrics: dict, prefix: str) -> dict[str, float]:
    return {
        k.removeprefix(prefix): float(v)
        for k, v in callback_metrics.items()
        if k.startswith(prefix)
    }


class MetricHistory(L.Callback):
    """`records`: [{"stage": "before" | "val" | "test", "epoch": int | None, "metrics": {...}}].

    "before" is a validation run outside fit while `module.eval_label == "before"`; its keys
    are read as "before/..." and, for a module that ignores eval_label, as "val/...".
    "val" records carry the 0-based epoch they ended.
    """

    def __init__(self) -> None:
        self.records: list[dict] = []
        self._restoring = False

    def _add(self, stage: str, epoch: int | None, metrics: dict[str, float]) -> None:
        if metrics:
            self.records.append({"stage": stage, "epoch": epoch, "metrics": metrics})

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        found = trainer.callback_metrics
        if trainer.state.fn == TrainerFn.FITTING:
            self._add("val", trainer.current_epoch, metrics_with_prefix(found, "val/"))
            return
        label = getattr(pl_module, "eval_label", None) or "val"
        metrics = metrics_with_prefix(found, f"{label}/") or metrics_with_prefix(found, "val/")
        self._add(label, None, metrics)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # which weights were tested (final or a checkpoint) is the caller's to say
        self._add("test", None, metrics_with_prefix(trainer.callback_metrics, "test/"))

    # -- queries -----------------------------------------------------------------------
    def stage(self, stage: str) -> list[dict]:
        return [r for r in self.records if r["stage"] == stage]

    def last(self, stage: str) -> dict | None:
        found = self.stage(stage)
        return found[-1] if found else None

    def best(self, stage: str = "val", key: str = "recall@1") -> dict | None:
        """The first record with the highest `key`: ModelCheckpoint keeps the first of equal
        scores too (it saves only on a strict improvement)."""
        best = None
        for r in self.stage(stage):
            if key in r["metrics"] and (best is None or r["metrics"][key] > best["metrics"][key]):
                best = r
        return best

    # -- checkpoint --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"records": [dict(r, metrics=dict(r["metrics"])) for r in self.records]}

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint
    ) -> None:
        # Lightning restores callback state for test(ckpt_path=...) too: only a resumed fit
        # takes the checkpoint's history, a test of the best checkpoint keeps this run's
        self._restoring = trainer.state.fn == TrainerFn.FITTING

    def load_state_dict(self, state_dict: dict) -> None:
        if not self._restoring:
            return
        self._restoring = False
        saved = list(state_dict.get("records", []))
        # the checkpoint's history wins; a "before" evaluated in this process is kept
        # only when the checkpoint has none (a resumed run may skip it)
        mine = [r for r in self.records if r["stage"] == "before"]
        if any(r["stage"] == "before" for r in saved):
            mine = []
        self.records = mine + saved
