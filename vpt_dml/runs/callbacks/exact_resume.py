"""Exact resume: what a checkpoint needs beyond model, optimizers and schedulers.

Lightning restores weights (H is a persistent buffer), optimizers, schedulers and loop
counters, but not the random number generators, and it never advances the epoch of a
batch sampler (it only calls `set_epoch` on `batch_sampler.sampler`). Without both, the
augmentations and the class-balanced batches after a resume differ from the straight run.

Checkpoints also record which run wrote them (task_name, overrides, the resolved config,
and the keys earlier resumes changed on purpose): a resume compares its own config with
it (vpt_dml/runs/resume.py), and a checkpoint given to another preset is named in the error.

On SIGTERM (Lightning turns it into `SIGTERMException` at the next batch boundary) the
checkpoint to resume from is the last epoch-end `last.ckpt`: the interrupted epoch's
progress is dropped and redone, exactly, on resume. Only when no epoch-end checkpoint exists
yet (killed during the first epoch) is the mid-epoch state saved there; resuming from it
continues the epoch, but not exactly as an uninterrupted run would.
"""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vpt_dml.checkpoints import load_checkpoint


def rng_state() -> dict:
    """Plain tensors and tuples only: Lightning loads checkpoints with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ExactResume(L.Callback):
    """Saves the RNG state with every checkpoint and restores it where the run left off.

    `run_info`: what the checkpoint records about its run (task_name, overrides, config,
    changed).
    `interrupt_checkpoint`: where a SIGTERM leaves the checkpoint to resume from
    (`<run dir>/checkpoints/last.ckpt`); None: SIGTERM saves nothing. After a SIGTERM,
    `interrupted` says what was kept or saved.
    """

    def __init__(
        self, run_info: dict | None = None, interrupt_checkpoint: str | Path | None = None
    ) -> None:
        self._pending: dict | None = None
        self.run_info = dict(run_info or {})
        self.interrupt_checkpoint = Path(interrupt_checkpoint) if interrupt_checkpoint else None
        self._mid_epoch = False
        self.interrupted: dict | None = None

    def state_dict(self) -> dict:
        # Checkpoints are written at train-epoch end, after validation: nothing draws random
        # numbers between here and the next epoch's start in the straight run. A mid-epoch
        # (SIGTERM) checkpoint has no such point: it carries no RNG state.
        rng = None if self._mid_epoch else rng_state()
        return {"rng": rng, "run": self.run_info, "mid_epoch": self._mid_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict.get("rng")

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException) or self.interrupt_checkpoint is None:
            return
        path = self.interrupt_checkpoint
        if trainer.state.fn != TrainerFn.FITTING and not path.is_file():
            return  # the evaluation before training: nothing trained, nothing to save
        report = {
            "signal": "SIGTERM",
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "checkpoint": str(path),
        }
        if not trainer.is_global_zero:
            self.interrupted = report
            return
        if path.is_file():
            # saved at the end of epoch index E, before the loop counts E as done
            done = int(load_checkpoint(path).get("epoch", -1)) + 1
            report.update(completed_epochs=done, mid_epoch=False)
            report["note"] = (
                f"{path.name} holds the state after {done} completed epoch(s); the progress of "
                "the interrupted epoch is lost and is redone, exactly, on resume"
            )
        else:
            # Written by rank zero alone, without Lightning's barrier: under DDP the other
            # ranks may be stopping too, and a barrier with a stopped rank never returns.
            self._mid_epoch = True
            try:
                checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            finally:
                self._mid_epoch = False
            path.parent.mkdir(parents=True, exist_ok=True)
            trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
            report.update(completed_epochs=trainer.current_epoch, mid_epoch=True)
            report["note"] = (
                f"no epoch had ended yet: {path.name} holds the mid-epoch state; resuming from "
                "it continues the epoch, but not exactly as an uninterrupted run would"
            )
        self.interrupted = report

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batch_sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
        if hasattr(batch_sampler, "set_epoch"):
            batch_sampler.set_epoch(trainer.current_epoch)
        if self._pending is None:
            return
        # Restored as late as possible: setup after loading a checkpoint may draw numbers
        # that the straight run never drew.
        set_rng_state(self._pending)
        self._pending = None
        # On resume Lightning creates the epoch's DataLoader iterator before this hook, and
        # that draws the loader's base seed (worker seeds) from the RNG we just replaced.
        # The straight run draws it after this hook: create the iterator again to match.
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)  # private, Lightning 2.x
        if fetcher is not None:
            iter(fetcher)
