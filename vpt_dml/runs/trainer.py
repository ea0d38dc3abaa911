"""The Trainer of a run: the configured callbacks and loggers plus the mandatory callbacks.

`build_trainer` returns the Trainer and `RunCallbacks`, the callbacks that metrics.json,
resume, SIGTERM and divergence need, by name: nothing searches `trainer.callbacks` by type.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from vpt_dml.errors import UserError
from vpt_dml.runs.callbacks.cost import CostMonitor
from vpt_dml.runs.callbacks.divergence import DivergenceGuard
from vpt_dml.runs.callbacks.eval_schedule import EvalSchedule
from vpt_dml.runs.callbacks.exact_resume import ExactResume
from vpt_dml.runs.callbacks.metric_history import MetricHistory
from vpt_dml.runs.checkpoint_io import AtomicCheckpointIO, DiskSpaceCheck
from vpt_dml.runs.provenance import cfg_without_hydra
from vpt_dml.runs.resume import run_config
from vpt_dml.runs.sigterm import SigtermGuard

SELECTION_KEY = "val/recall@1"


@dataclass
class RunCallbacks:
    """The callbacks every run has (its record is built from them), and the checkpoint
    callback that keeps the best epoch when one is configured."""

    resume: ExactResume
    sigterm: SigtermGuard
    schedule: EvalSchedule
    history: MetricHistory
    divergence: DivergenceGuard
    cost: CostMonitor
    selector: ModelCheckpoint | None

    def schedule_record(self) -> dict:
        s = self.schedule
        return {"start_epoch": s.start_epoch, "every_n_epochs": s.every_n_epochs}

    def best_checkpoint(self) -> str | None:
        return (self.selector.best_model_path or None) if self.selector else None


def build_trainer(cfg: DictConfig) -> tuple[L.Trainer, RunCallbacks]:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    out = Path(cfg.paths.output_dir)
    last = out / "checkpoints" / "last.ckpt"
    # not optional: a resumed run must equal a straight one; SIGTERM leaves a last.ckpt
    resume = ExactResume(
        # the resolved config too: a resume compares it with its own (runs/resume.py)
        run_info={
            "task_name": cfg.get("task_name"),
            "overrides": task_overrides(),
            "config": run_config(cfg),
        },
        interrupt_checkpoint=last,
    )
    # SIGTERM: every rank stops at the same batch end, workers leave it to them, a watchdog
    sigterm = SigtermGuard(out / "metrics.json", last)
    # not optional either: metrics.json is built from these
    ev = cfg.get("eval") or {}
    schedule = EvalSchedule(ev.get("start_epoch", 0), ev.get("every_n_epochs", 1))
    history = MetricHistory()
    # NaN/inf stops the run at that step, before any checkpoint of it (callbacks/divergence.py)
    divergence = DivergenceGuard(last)
    callbacks += [resume, sigterm, schedule, history, divergence, DiskSpaceCheck()]
    cost = next((c for c in callbacks if isinstance(c, CostMonitor)), None)
    if cost is None:  # callbacks=none: still measured, metrics.json has a cost block
        cost = CostMonitor()
        callbacks.append(cost)
    selector = selection_checkpoint(callbacks)
    check_selection(cfg, selector)
    # a logger factory may return None (W&B could not start): the others carry on
    loggers = [
        lg for c in (cfg.get("logger") or {}).values() if c and (lg := instantiate(c)) is not None
    ]
    if not loggers:  # logger=none: Lightning refuses a learning-rate monitor with nowhere to log
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    # checkpoints whole or absent, disk full as one line (checkpoint_io.py)
    trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):  # the whole run config, not only the module's part
            lg.log_hyperparams(OmegaConf.to_container(cfg_without_hydra(cfg), resolve=True))
    return trainer, RunCallbacks(resume, sigterm, schedule, history, divergence, cost, selector)


def check_selection(cfg: DictConfig, selector: ModelCheckpoint | None) -> None:
    every = cfg.trainer.get("check_val_every_n_epoch", 1)
    if every not in (1, None):
        # Lightning's own cadence would skip the final epoch and stop last.ckpt every epoch
        raise UserError(
            f"trainer.check_val_every_n_epoch={every} is not supported: set "
            f"eval.every_n_epochs={every} instead (eval.start_epoch sets the first evaluated epoch)"
        )
    if cfg.data.get("val_classes") and selector is None:
        raise UserError(
            "data.val_classes>0 tests the checkpoint chosen on the validation classes, but no "
            f"ModelCheckpoint monitors {SELECTION_KEY}: keep callbacks.model_checkpoint"
        )


def selection_checkpoint(callbacks: list) -> ModelCheckpoint | None:
    """The checkpoint callback that keeps the best epoch (highest val/recall@1)."""
    return next(
        (
            c
            for c in callbacks
            if isinstance(c, ModelCheckpoint) and c.monitor == SELECTION_KEY and c.mode == "max"
        ),
        None,
    )


def task_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
