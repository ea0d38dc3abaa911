"""One run from start to record: the recipe (vpt_dml/train.py) inside its lifecycle.

Before the recipe: the seed drawn for seed=null, the config checked, a resume's checkpoint
loaded safely and compared with this config, the run folder claimed (runs/folder.py), a
DDP sweep refused. Around it: the Trainer with its mandatory callbacks (runs/trainer.py),
a resume's CSV history trimmed. After it: metrics.json for every way it ends (finished,
SIGTERM, diverged: runs/record.py), and the SIGTERM handler put back.
"""

from __future__ import annotations

import functools
import os
import secrets
import sys
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, open_dict

from vpt_dml.checkpoints import check_resumable, load_checkpoint
from vpt_dml.distributed import is_global_zero
from vpt_dml.errors import Diverged, Interrupted, UserError
from vpt_dml.runs import cluster, folder
from vpt_dml.runs.config_schema import check_config
from vpt_dml.runs.outcome import (
    provenance_of,
    record_finished,
    record_interrupted,
    write_diverged,
)
from vpt_dml.runs.record import run_provenance
from vpt_dml.runs.rerun import continue_in_folder
from vpt_dml.runs.resume import ResumePlan, plan_resume, stored_run, trim_csv_history
from vpt_dml.runs.trainer import RunCallbacks, build_trainer, task_overrides
from vpt_dml.train import Built, train

SEED_ENV = "VPT_DML_DRAWN_SEED"  # the seed drawn for seed=null, inherited by DDP children


def enter_job(cfg: DictConfig) -> None:
    """At the top of `vpt_dml.run`'s main: ranks of a local submitit job, the run folder's
    earlier run (resume / skip / run), and SLURM's warning signal."""
    cluster.export_local_ranks()
    continue_in_folder(cfg)
    cluster.watch_requeue_signals()


def refuse_ddp_sweep(cfg: DictConfig) -> None:
    """`-m` with a multi-device DDP strategy makes every child launch its own sweep."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    if cluster.jobs_are_processes():  # submitit: every job is its own process group
        return
    strategy = str(cfg.trainer.get("strategy", "auto"))
    devices = cfg.trainer.get("devices", 1)
    many = (
        devices in (-1, "-1", "auto")
        or (isinstance(devices, int) and devices > 1)
        or (isinstance(devices, str) and "," in devices)
    )
    if "ddp" in strategy.lower() and many:  # "ddp", or a DDPStrategy node (trainer=ddp)
        raise UserError(
            f"a sweep (-m) cannot run trainer.strategy={strategy} on devices={devices} in one "
            "process: add hydra/launcher=local or hydra/launcher=slurm (one process per job), or "
            'loop over the values in the shell (README "On a cluster")'
        )


def refuse_training_nothing(cfg: DictConfig) -> None:
    """A run that trains no step would record the untrained model as a finished training
    (metrics.json "finished", its `final` and `best` rows the untrained model's)."""
    trainer = cfg.get("trainer") or {}
    for key in ("max_epochs", "max_steps", "limit_train_batches"):
        value = trainer.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
            raise UserError(
                f"trainer.{key}={value} trains nothing, and metrics.json would record the "
                f"untrained model as a finished run; give trainer.{key}>=1 (the untrained "
                "model's metrics are every run's \"before\" row: eval_before_training=true)"
            )


def start_run(cfg: DictConfig) -> tuple[dict | None, ResumePlan | None]:
    """Before any work: ckpt_path, when given, is a checkpoint that loads safely
    (checkpoints.py), written with this run's config (resume.py; checked against the built
    model by check_resumable)."""
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path:
        return None, None
    ckpt = load_checkpoint(ckpt_path)
    return ckpt, plan_resume(ckpt, cfg, ckpt_path)


def before_run_folder(train_fn):
    """What is settled before the run folder is claimed and its config_resolved.yaml
    rewritten: seed=null becomes a drawn seed (a resume takes the checkpoint's), so every
    record names it; a resume whose config differs from its checkpoint's is refused, so
    the refused command leaves the run folder it points at as it was."""

    @functools.wraps(train_fn)
    def wrapper(cfg: DictConfig, *args, **kwargs):
        if "seed" in cfg and cfg.seed is None:
            seed = null_seed(cfg)
            with open_dict(cfg):
                cfg.seed = seed
        if cfg.get("ckpt_path"):
            check_config(cfg)
            start_run(cfg)
        return train_fn(cfg, *args, **kwargs)

    return wrapper


def null_seed(cfg: DictConfig) -> int:
    if cfg.get("ckpt_path"):
        saved = (stored_run(load_checkpoint(cfg.ckpt_path)).get("config") or {}).get("seed")
        if isinstance(saved, int):
            return saved
    if os.environ.get(SEED_ENV, "").isdigit():  # a DDP child of the process that drew it
        return int(os.environ[SEED_ENV])
    if not is_global_zero():
        raise UserError(
            "seed=null under a multi-process launch (torchrun, srun): each process would draw "
            "its own seed; give seed=N"
        )
    seed = secrets.randbelow(2**31)
    os.environ[SEED_ENV] = str(seed)
    print(f"seed=null: drew seed={seed} (recorded in config_resolved.yaml and metrics.json)",
          file=sys.stderr)  # fmt: skip
    return seed


@before_run_folder
@folder.owns_run_folder  # lock, writable check, config_resolved.yaml; released after
def run_training(cfg: DictConfig) -> dict:
    """One whole run in this process (`vpt_dml.run.train` is this): returns the flat
    metrics; raises Interrupted (SIGTERM, recorded), Diverged (recorded), UserError."""
    check_config(cfg)  # typos, wrong types, self-contradictory methods: before anything runs
    refuse_training_nothing(cfg)
    # ckpt_path is a checkpoint that loads safely, written with this config
    resume, plan = start_run(cfg)
    refuse_ddp_sweep(cfg)
    built = Built()
    made: list[RunCallbacks] = []

    def check_model(module) -> None:
        nonlocal resume
        if resume is not None:  # the checkpoint fits this model, before any evaluation
            check_resumable(resume, module, cfg.ckpt_path, task_overrides())
            resume = None  # memory-mapped; Lightning loads it again

    def make_trainer(cfg: DictConfig):
        trainer, callbacks = build_trainer(cfg)
        made.append(callbacks)
        if plan is not None:
            continue_history(trainer, callbacks, plan, cfg)
        return trainer, callbacks.selector

    try:  # SIGTERM in the evaluation before training, in fit or in the final test
        train(cfg, make_trainer, check_model, evaluate_before=plan is None, built=built)
        return record_finished(cfg, built, made[0], plan)
    except SIGTERMException:  # preemption, docker stop (ExactResume kept a last.ckpt)
        if not made:
            raise
        raise Interrupted(record_interrupted(cfg, built, made[0], plan)) from None
    except Diverged as e:  # metrics.json "status": "diverged"; last.ckpt stays finite
        if made:
            prov = run_provenance(
                cfg, built.trainer, built.module, built.datamodule, provenance_of(cfg, built.module)
            )
            write_diverged(e, cfg, built, made[0], prov)
        raise
    finally:  # the run is over: its SIGTERM watchdog must not end a process that goes on
        if made:
            made[0].sigterm.close()


def continue_history(
    trainer: L.Trainer, callbacks: RunCallbacks, plan: ResumePlan, cfg: DictConfig
) -> None:
    """The resumed run's checkpoints carry every change so far; its CSV history drops what
    was logged after the checkpoint (the interrupted epoch's partial rows, an earlier final
    test), which the resumed run logs again."""
    callbacks.resume.run_info["changed"] = list(plan.changed)
    step = int(load_checkpoint(cfg.ckpt_path).get("global_step", 0))
    for lg in trainer.loggers:
        if isinstance(lg, CSVLogger):
            trim_csv_history(Path(lg.log_dir) / "metrics.csv", step)
