"""Exact resume: what a checkpoint needs beyond model, optimizers and schedulers.

Lightning restores weights (H is a persistent buffer), optimizers, schedulers and loop
counters, but not the random number generators, and it never advances the epoch of a
batch sampler (it only calls `set_epoch` on `batch_sampler.sampler`). Without both, the
augmentations and the class-balanced batches after a resume differ from the straight run.
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch


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
    """Saves the RNG state with every checkpoint and restores it where the run left off."""

    def __init__(self) -> None:
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        # Checkpoints are written at train-epoch end, after validation: nothing draws random
        # numbers between here and the next epoch's start in the straight run.
        return {"rng": rng_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict.get("rng")

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
