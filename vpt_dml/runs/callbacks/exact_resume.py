"""Exact resume: what a checkpoint needs beyond model, optimizers and schedulers.

Lightning restores weights (H is a persistent buffer), optimizers, schedulers and loop
counters, but not the random number generators, and it never advances the epoch of a
batch sampler (it only calls `set_epoch` on `batch_sampler.sampler`). Without both, the
augmentations and the class-balanced batches after a resume differ from the straight run.

Checkpoints also record which run wrote them (task_name, overrides, the resolved config,
and the keys earlier resumes changed on purpose): a resume compares its own config with
it (vpt_dml/runs/resume.py), and a checkpoint given to another preset is named in the error.

On SIGTERM (Lightning turns it into `SIGTERMException` at the next batch boundary; SLURM's
time-limit signal does the same, runs/cluster) the run saves the newest state it has:

- exact mid-epoch: when the epoch's batches are a function of (seed, epoch) alone (the
  batch sampler has `set_epoch`) and drawn in this process (`num_workers=0`), last.ckpt gets
  the state after the last finished batch, with the RNG state there. The resume draws the
  epoch's plan again (set_epoch), skips the finished batches (their index lists only: no
  image is loaded for them) and restores the RNG after that: it continues exactly as the
  uninterrupted run, so a requeue redoes nothing and an allocation shorter than an epoch
  still advances. Not covered: the CSV's `train/loss_epoch` of the resumed epoch averages
  the batches after the resume only (per-step rows and all metrics are exact);
- otherwise an epoch-end last.ckpt is kept (the interrupted epoch is redone, exactly, on
  resume: DataLoader workers draw their own random numbers, which no checkpoint holds), and
  a missing or older mid-epoch one is replaced by the current state (it continues the
  epoch, not exactly as an uninterrupted run would).

What the record says is read back from the file that is left (epoch, step, mid-epoch), never
from the trainer.
"""

from __future__ import annotations

import os
import random
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vpt_dml.checkpoints import load_checkpoint
from vpt_dml.runs import requeue_budget
from vpt_dml.runs.cluster import _process_start


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
        self._mid_epoch: bool | str = False  # while writing one: True (exact) or "inexact"
        self._resume_mid_epoch = False
        self.interrupted: dict | None = None
        self._epoch_s: float | None = None  # measured (or recorded by the checkpoint)
        self._epoch_started: float | None = None
        self._warned = False

    def state_dict(self) -> dict:
        # Epoch-end checkpoints are written after validation: nothing draws random numbers
        # between here and the next epoch's start in the straight run. An exact mid-epoch
        # checkpoint is written after a finished batch, before the next one is loaded: its
        # RNG state is where the straight run continues. An inexact one carries none.
        rng = None if self._mid_epoch == "inexact" else rng_state()
        return {"rng": rng, "run": self.run_info, "mid_epoch": bool(self._mid_epoch),
                "exact": self._mid_epoch != "inexact", "epoch_s": self._epoch_s}  # fmt: skip

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict.get("rng")
        self._resume_mid_epoch = bool(state_dict.get("mid_epoch")) and self._pending is not None
        self._epoch_s = state_dict.get("epoch_s")

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException) or self.interrupt_checkpoint is None:
            return
        path = self.interrupt_checkpoint
        if trainer.state.fn != TrainerFn.FITTING and not path.is_file():
            return  # the evaluation before training: nothing trained, nothing to save
        if not trainer.is_global_zero:
            self.interrupted = {"signal": "SIGTERM", "checkpoint": str(path)}
            return
        exact = exact_mid_epoch(trainer)
        on_file = _saved_position(path)
        newer = on_file is None or trainer.global_step > on_file[1]
        # an inexact mid-epoch state never replaces an epoch-end one (exact, the epoch redone)
        if newer and trainer.state.fn == TrainerFn.FITTING and (exact or not on_file or on_file[2]):
            # Written by rank zero alone, without Lightning's barrier: under DDP the other
            # ranks may be stopping too, and a barrier with a stopped rank never returns.
            self._mid_epoch = True if exact else "inexact"
            try:
                checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            finally:
                self._mid_epoch = False
            path.parent.mkdir(parents=True, exist_ok=True)
            trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
        self.interrupted = interruption_record(path, trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A mid-epoch resume: Lightning calls no epoch-start hook for the epoch it continues.
        The epoch's plan drawn again, its finished batches skipped, then the RNG restored."""
        if self._epoch_s is not None:  # a requeued allocation knows the epoch time already
            self._check_budget(trainer)
        if not self._resume_mid_epoch:
            return
        self._resume_mid_epoch = False
        batch_sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
        if hasattr(batch_sampler, "set_epoch"):
            batch_sampler.set_epoch(trainer.current_epoch)
        fetcher = trainer.fit_loop._data_fetcher  # private, Lightning 2.x
        iter(fetcher)  # the iterator built before the restore may have drawn another plan
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        _skip_batches(trainer, done)
        set_rng_state(self._pending)
        self._pending = None
        # Lightning warns that a plain DataLoader cannot resume mid-epoch: here it did
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._epoch_started is not None:
            self._epoch_s = time.monotonic() - self._epoch_started
            self._epoch_started = None
            self._check_budget(trainer)

    def _check_budget(self, trainer: L.Trainer) -> None:
        """Once per process: warn when an allocation cannot advance a run that redoes its
        interrupted epoch (runs/requeue_budget.py); exact mid-epoch resumes need no warning."""
        if self._warned or not trainer.is_global_zero or resumes_mid_epoch_exactly(trainer):
            return
        self._warned = True
        started = _process_start(os.getpid())
        startup = time.time() - started if started else 0.0
        requeue_budget.warn_if_too_short(self._epoch_s or 0.0, startup)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_started = time.monotonic()
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


def resumes_mid_epoch_exactly(trainer: L.Trainer) -> bool:
    """The epoch's batches are a function of (seed, epoch) (the batch sampler has
    set_epoch) and every random number is drawn in this process (no DataLoader workers)."""
    loader = trainer.train_dataloader
    batch_sampler = getattr(loader, "batch_sampler", None)
    return hasattr(batch_sampler, "set_epoch") and getattr(loader, "num_workers", 1) == 0


def exact_mid_epoch(trainer: L.Trainer) -> bool:
    """Whether a resume from this point can continue exactly: see above, and training is
    between two batches (not in the epoch-end validation)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return (
        resumes_mid_epoch_exactly(trainer)
        and not trainer.validating
        and 0 < progress.completed < trainer.num_training_batches
    )


def _skip_batches(trainer: L.Trainer, count: int) -> None:
    """Advance the epoch's batch sampler past `count` batches without loading them."""
    combined = trainer.fit_loop._combined_loader  # private, Lightning 2.x
    iterators = getattr(getattr(combined, "_iterator", None), "iterators", None) or []
    for it in iterators:
        for _ in range(count):
            it._next_index()  # torch's DataLoader iterator: the next index list only
        it._num_yielded += count


def _saved_position(path: Path) -> tuple[int, int, bool] | None:
    """(epoch index, global step, mid-epoch) of the checkpoint at `path`; None when absent."""
    if not path.is_file():
        return None
    ckpt = load_checkpoint(path)
    own = (ckpt.get("callbacks") or {}).get("ExactResume") or {}
    return int(ckpt.get("epoch", -1)), int(ckpt.get("global_step", 0)), bool(own.get("mid_epoch"))


def interruption_record(path: Path, trainer: L.Trainer) -> dict:
    """What metrics.json says about an interruption: read back from the file left at `path`
    (it may be older than the trainer's state), with what a resume redoes."""
    report = {"signal": "SIGTERM", "checkpoint": str(path), "stopped_at_step": trainer.global_step}
    on_file = _saved_position(path)
    if on_file is None:
        report.update(completed_epochs=0, global_step=0, mid_epoch=False)
        report["note"] = "no checkpoint was saved"
        return report
    ckpt = load_checkpoint(path)
    own = (ckpt.get("callbacks") or {}).get("ExactResume") or {}
    epoch, step, mid = on_file
    done = epoch if mid else epoch + 1
    report.update(completed_epochs=done, global_step=step, mid_epoch=mid)
    lost = trainer.global_step - step
    if mid and own.get("exact", own.get("rng") is not None):
        batches = (ckpt.get("loops") or {}).get("fit_loop", {})
        batches = batches.get("epoch_loop.batch_progress", {}).get("current", {}).get("completed")
        note = (
            f"{path.name} holds the mid-epoch state after step {step} ({batches} batch(es) of epoch "
            f"{epoch}); a resume continues from there exactly as the uninterrupted run"
        )
    elif mid:
        note = (
            f"{path.name} holds the mid-epoch state after step {step} (epoch {epoch}); "
            "resuming from it continues the epoch, but not exactly as an uninterrupted run "
            "would (DataLoader workers or the epoch-end evaluation)"
        )
    else:
        note = (
            f"{path.name} holds the state after {done} completed epoch(s) (step {step}); "
            "the interrupted epoch's progress is redone, exactly, on resume"
        )
    if lost > 0:
        note += f"; the {lost} step(s) after it are redone"
    report["note"] = note
    return report
