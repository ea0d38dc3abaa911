"""`python -m vpt_dml.run [+experiment=NAME] [overrides]`: train, evaluate, record.

Writes into the run folder (hydra.run.dir): checkpoints/, csv/metrics.csv,
metrics.json (before / final / best metrics, cost and provenance: vpt_dml/results.py),
config_resolved.yaml (written at start).
Bad input ends in one `error:` line and exit 2 (`debug=true` or HYDRA_FULL_ERROR=1 show the
traceback); SIGTERM ends in exit 143 with metrics.json marked "status": "interrupted"; a NaN/inf loss
or weights end in exit 3 with "status": "diverged" (callbacks/divergence.py).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import signal
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from vpt_dml import cluster, completion, distributed, run_folder
from vpt_dml.callbacks import ExactResume
from vpt_dml.callbacks.cost import CostMonitor
from vpt_dml.callbacks.divergence import DIVERGED_EXIT, Diverged, DivergenceGuard, write_diverged
from vpt_dml.callbacks.eval_schedule import EvalSchedule
from vpt_dml.callbacks.metric_history import MetricHistory
from vpt_dml.callbacks.wandb_logger import finish_wandb
from vpt_dml.checkpoint_io import AtomicCheckpointIO, DiskSpaceCheck
from vpt_dml.checkpoints import check_resumable, load_checkpoint
from vpt_dml.config_checks import check_command_line, check_config
from vpt_dml.errors import UserError
from vpt_dml.evaluation import per_query
from vpt_dml.models.backbone import data_config, weights_report
from vpt_dml.models.build import prepare_backbone
from vpt_dml.models.method_summary import effective_method
from vpt_dml.module import VPTDMLModule
from vpt_dml.protocol import protocol
from vpt_dml.provenance import cfg_without_hydra
from vpt_dml.results import add_embedding_health, build_result, run_provenance
from vpt_dml.resume import ResumePlan, plan_resume, run_config, trim_csv_history, warn_uncompared
from vpt_dml.summary import print_summary
from vpt_dml.watchdog import (
    SigtermGuard,
    enable_watchdog,
    exit_within,
    sigterm_received,
    timeout_from_env,
)

log = logging.getLogger("vpt_dml")
# faiss logs each missing CPU-specific build it probes (avx512, avx2) as an error-looking line
logging.getLogger("faiss.loader").setLevel(logging.WARNING)


# A shell reports a process ended by SIGTERM as 128 + 15; schedulers read it as "killed".
SIGTERM_EXIT = 128 + signal.SIGTERM


class Interrupted(Exception):
    """SIGTERM stopped training; the message says what was saved."""


def build_datamodule(cfg: DictConfig):
    return instantiate(cfg.data, _convert_="all")


def build_module(cfg: DictConfig, num_classes: int, eval_ks) -> VPTDMLModule:
    def plain(node):
        return OmegaConf.to_container(node, resolve=True)

    prepare_backbone(plain(cfg.model))  # the demo's weights file, made once (building never trains)
    return VPTDMLModule(
        model=plain(cfg.model),
        loss=plain(cfg.loss),
        optim=plain(cfg.optim),
        num_classes=num_classes,
        eval_ks=eval_ks,
        clustering_every_epoch=bool(cfg.get("eval", {}).get("clustering_every_epoch", False)),
    )


def build_trainer(cfg: DictConfig) -> L.Trainer:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    # not optional: a resumed run must equal a straight one; SIGTERM leaves a last.ckpt
    callbacks.append(
        ExactResume(
            # the resolved config too: a resume compares it with its own (vpt_dml/resume.py)
            run_info={
                "task_name": cfg.get("task_name"),
                "overrides": task_overrides(),
                "config": run_config(cfg),
            },
            interrupt_checkpoint=Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt",
        )
    )
    # SIGTERM: every rank stops at the same batch end, workers leave it to them, a watchdog
    out = Path(cfg.paths.output_dir)
    callbacks.append(SigtermGuard(out / "metrics.json", out / "checkpoints" / "last.ckpt"))
    # not optional either: metrics.json is built from these
    ev = cfg.get("eval") or {}
    callbacks.append(EvalSchedule(ev.get("start_epoch", 0), ev.get("every_n_epochs", 1)))
    callbacks.append(MetricHistory())
    # NaN/inf stops the run at that step, before any checkpoint of it (callbacks/divergence.py)
    callbacks.append(DivergenceGuard(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"))
    callbacks.append(DiskSpaceCheck())
    if not any(isinstance(c, CostMonitor) for c in callbacks):
        callbacks.append(CostMonitor())
    check_selection(cfg, callbacks)
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
    return trainer


def check_selection(cfg: DictConfig, callbacks: list) -> None:
    every = cfg.trainer.get("check_val_every_n_epoch", 1)
    if every not in (1, None):
        # Lightning's own cadence would skip the final epoch and stop last.ckpt every epoch
        raise UserError(
            f"trainer.check_val_every_n_epoch={every} is not supported: set "
            f"eval.every_n_epochs={every} instead (eval.start_epoch sets the first evaluated epoch)"
        )
    if cfg.data.get("val_classes") and selection_checkpoint(callbacks) is None:
        raise UserError(
            "data.val_classes>0 tests the checkpoint chosen on the validation classes, but no "
            f"ModelCheckpoint monitors {SELECTION_KEY}: keep callbacks.model_checkpoint"
        )


SELECTION_KEY = "val/recall@1"


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


def backbone_provenance(b: DictConfig, vit=None) -> dict:
    """Which backbone, and where its weights came from (file size, SHA-256, key counts)."""
    out = {
        "name": b.name,
        "pretrained": bool(b.pretrained or b.weights),
        "weights": b.weights or ("timm hub" if b.pretrained else "random init"),
    }
    if b.get("synthetic_pretraining") and b.weights:
        out["made_by"] = "vpt_dml synthetic pretraining on generated classes outside the dataset"
    if vit is not None and weights_report(vit) is not None:
        out["weights_file"] = weights_report(vit)
    return out


def provenance_of(cfg: DictConfig, module) -> dict:
    return backbone_provenance(cfg.model.backbone, module.embedder.backbone.vit)


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


def start_run(cfg: DictConfig) -> tuple[dict | None, ResumePlan | None]:
    """Before any work: ckpt_path, when given, is a checkpoint that loads safely
    (checkpoints.py), written with this run's config (resume.py; checked against the built
    model by check_resumable)."""
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path:
        return None, None
    ckpt = load_checkpoint(ckpt_path)
    return ckpt, plan_resume(ckpt, cfg, ckpt_path)


SEED_ENV = "VPT_DML_DRAWN_SEED"  # the seed drawn for seed=null, inherited by DDP children


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
        from vpt_dml.resume import stored_run

        saved = (stored_run(load_checkpoint(cfg.ckpt_path)).get("config") or {}).get("seed")
        if isinstance(saved, int):
            return saved
    if os.environ.get(SEED_ENV, "").isdigit():  # a DDP child of the process that drew it
        return int(os.environ[SEED_ENV])
    if not run_folder.is_global_zero():
        raise UserError(
            "seed=null under a multi-process launch (torchrun, srun): each process would draw "
            "its own seed; give seed=N"
        )
    seed = secrets.randbelow(2**31)
    os.environ[SEED_ENV] = str(seed)
    print(f"seed=null: drew seed={seed} (recorded in config_resolved.yaml and metrics.json)",
          file=sys.stderr)  # fmt: skip
    return seed


def record_interrupted(
    cfg: DictConfig, trainer: L.Trainer, module, dm, before: dict, plan: ResumePlan | None = None
) -> str:
    """metrics.json of a run stopped by SIGTERM; returns the line that says what is left."""
    resume = next((c for c in trainer.callbacks if isinstance(c, ExactResume)), None)
    info = dict((resume.interrupted if resume else None) or {"signal": "SIGTERM"})
    # what was logged so far (val/..., train/...): no test metrics exist yet
    metrics = {
        k: float(v)
        for k, v in trainer.callback_metrics.items()
        if isinstance(v, torch.Tensor) and v.numel() == 1
    }
    first = before.get("before/recall@1", before.get("val/recall@1"))
    history = next((c for c in trainer.callbacks if isinstance(c, MetricHistory)), None)
    kept = history.last("before") if history and first is None else None  # a resume's
    if kept is not None:
        first = kept["metrics"].get("recall@1")
    if first is not None:
        metrics["recall@1_before"] = float(first)
    out_dir = Path(cfg.paths.output_dir)
    result = {
        "status": "interrupted",
        "interrupted": info,
        "metrics": metrics,
        "provenance": run_provenance(cfg, trainer, module, dm, provenance_of(cfg, module)),
    }
    record_resume(result, plan)
    if not trainer.is_global_zero:
        return f"[rank {trainer.global_rank}] stopped by SIGTERM; rank 0 says what was saved"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    ckpt = info.get("checkpoint")
    saved = (
        f"{info.get('note')}; resume with ckpt_path={ckpt}"
        if ckpt and Path(ckpt).is_file()
        else "no checkpoint was saved"
    )
    done = info.get("completed_epochs", trainer.current_epoch)
    return f'SIGTERM after {done} completed epoch(s): {saved}; metrics.json says "status": "interrupted"'


@before_run_folder
@run_folder.owns_run_folder  # lock, writable check, config_resolved.yaml; released after
def train(cfg: DictConfig) -> dict:
    check_config(cfg)  # typos, wrong types, self-contradictory methods: before anything runs
    # ckpt_path is a checkpoint that loads safely, written with this config
    resume, plan = start_run(cfg)
    refuse_ddp_sweep(cfg)
    if cfg.get("seed") is not None:  # seed 0 is a seed
        L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    dm = build_datamodule(cfg)
    splits = dm.load()
    module = build_module(cfg, splits.train.num_classes, dm.recall_ks)
    if resume is not None:  # the checkpoint fits this model, before any evaluation
        check_resumable(resume, module, cfg.ckpt_path, task_overrides())
        resume = None  # memory-mapped; Lightning loads it again
    # Preprocessing follows the backbone's own pretrained config (size, mean, std).
    pre = data_config(module.embedder.backbone.vit)
    dm.set_preprocessing(pre["image_size"], pre["mean"], pre["std"])
    if (cfg.get("eval") or {}).get("per_query", True):  # per_query/*.parquet (evidence)
        module.per_query_dir, module.per_query_held_out = out_dir, bool(dm.val_classes)
    trainer = build_trainer(cfg)
    if plan is not None:
        continue_history(trainer, plan, cfg)

    before: dict = {}
    try:  # SIGTERM in the evaluation before training, in fit or in the final test
        # a resume keeps the checkpoint's evaluation before training (MetricHistory restores it)
        if cfg.get("eval_before_training", True) and plan is None:
            module.eval_label = "before"  # logged as before/<metric>, not as an epoch's val/
            try:
                before = trainer.validate(module, datamodule=dm, verbose=False)[0]
            finally:
                module.eval_label = None
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        return finish(cfg, trainer, module, dm, out_dir, plan)
    except SIGTERMException:  # preemption, docker stop (ExactResume kept a last.ckpt)
        raise Interrupted(record_interrupted(cfg, trainer, module, dm, before, plan)) from None
    except Diverged as e:  # metrics.json "status": "diverged"; last.ckpt stays finite
        prov = run_provenance(cfg, trainer, module, dm, provenance_of(cfg, module))
        write_diverged(e, trainer, module, out_dir, bool(dm.val_classes), prov)
        raise
    finally:  # the run is over: its SIGTERM watchdog must not end a process that goes on
        for c in trainer.callbacks:
            if isinstance(c, SigtermGuard):
                c.close()


def continue_history(trainer: L.Trainer, plan: ResumePlan, cfg: DictConfig) -> None:
    """The resumed run's checkpoints carry every change so far; its CSV history drops what
    was logged after the checkpoint (the interrupted epoch's partial rows, an earlier final
    test), which the resumed run logs again."""
    resume_cb = next(c for c in trainer.callbacks if isinstance(c, ExactResume))
    resume_cb.run_info["changed"] = list(plan.changed)
    step = int(load_checkpoint(cfg.ckpt_path).get("global_step", 0))
    for lg in trainer.loggers:
        if isinstance(lg, CSVLogger):
            trim_csv_history(Path(lg.log_dir) / "metrics.csv", step)


def record_resume(result: dict, plan: ResumePlan | None) -> None:
    if plan is None:
        return
    result["resume"] = plan.record()
    if not plan.compared:
        result.setdefault("warnings", []).append(warn_uncompared(plan))


SMOKE_TEST = "smoke test"


def finish(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: VPTDMLModule,
    dm,
    out_dir: Path,
    plan: ResumePlan | None = None,
) -> dict:
    """Test, then write metrics.json (config_resolved.yaml was written at start by
    run_folder); returns the flat metrics."""
    held_out = bool(dm.val_classes)
    selector = selection_checkpoint(trainer.callbacks)
    best_path = (selector.best_model_path or None) if selector else None
    last_epoch = trainer.current_epoch - 1
    # held-out protocol: the test split is evaluated once, on the selected checkpoint
    trainer.test(module, datamodule=dm, verbose=False, ckpt_path=best_path if held_out else None)

    history = next(c for c in trainer.callbacks if isinstance(c, MetricHistory))
    cost = next(c for c in trainer.callbacks if isinstance(c, CostMonitor))
    schedule = next(c for c in trainer.callbacks if isinstance(c, EvalSchedule))
    result = build_result(
        history,
        held_out=held_out,
        last_epoch=last_epoch,
        best_checkpoint=best_path,
        schedule={"start_epoch": schedule.start_epoch, "every_n_epochs": schedule.every_n_epochs},
        cost=cost.summary(module),
        provenance=run_provenance(cfg, trainer, module, dm, provenance_of(cfg, module)),
    )
    # what actually trained, read from the built model rather than the config's names
    result["method"] = effective_method(module)
    add_embedding_health(result, module.embedding_health_log)  # and a warning if collapsed
    record_resume(result, plan)
    if trainer.fast_dev_run:  # Lightning's smoke test: a batch or a few, nothing to compare
        batches = 1 if trainer.fast_dev_run is True else int(trainer.fast_dev_run)
        result["status"] = SMOKE_TEST
        result.setdefault("warnings", []).append(
            f"trainer.fast_dev_run: {batches} batch(es) per stage and no checkpoints; the "
            "numbers only show that the pipeline runs"
        )
    result["protocol"] = protocol(dm, result)
    if trainer.is_global_zero:
        if module.per_query_dir is not None:  # the selected epoch's table becomes test_best
            best_epoch = None if held_out else (result.get("best") or {}).get("epoch")
            result["per_query"] = per_query.finalize(out_dir, best_epoch)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        print_summary(result, out_dir)
    return result["metrics"]


def one_line(e: Exception) -> str:
    """The message of a config error, as one line."""
    if isinstance(e, InstantiationException):
        if isinstance(e.__cause__, UserError):
            return str(e.__cause__)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        key = next(
            (line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), None
        )
        cause = " ".join(line for line in lines[1:] if not line.startswith("full_key:"))
        where = f"the {key} settings" if key else "a config node"
        return (
            f"{where} were refused: {cause or lines[0]}; fix the overrides of {key or 'that node'}"
        )
    return " ".join(str(e).split("\n"))


def stop_interrupted(line: str) -> None:
    """Exit 143 after an interruption: the `interrupted:` line, the SLURM requeue when one
    was asked for, and an exit bounded in time whatever the shutdown waits for."""
    exit_within(timeout_from_env())
    print(f"interrupted: {line}", file=sys.stderr)
    if requeued := cluster.requeue_if_asked():
        print(requeued, file=sys.stderr)
    sys.exit(SIGTERM_EXIT)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    debug = bool(cfg.get("debug", False)) or os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        cluster.enter_job(cfg)  # ranks, requeued job / sweep rerun (resume, skip), SIGUSR
        metrics = train(cfg)
        if sigterm_received():  # too late to stop the run, which finished: stop the process
            stop_interrupted(
                "SIGTERM came as the run finished; its metrics.json is complete "
                "(a sweep rerun skips it)"
            )
    except cluster.Skip as e:
        print(e, file=sys.stderr)
        return e.value
    except Interrupted as e:
        stop_interrupted(str(e))
    except SIGTERMException:  # outside fit: the evaluation before training or the final test
        stop_interrupted(
            "SIGTERM outside training (evaluation before it, or the final test); "
            "metrics.json was not written"
        )
    except Diverged as e:  # metrics.json says "status": "diverged" (callbacks/divergence.py)
        print(f"diverged: {e}", file=sys.stderr)
        sys.exit(DIVERGED_EXIT)
    except (UserError, InstantiationException) as e:
        if debug:
            raise
        if distributed.is_rank_zero_process():  # every DDP rank hits the same error
            print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    finally:
        finish_wandb()  # the next job of a sweep opens its own W&B run
    # the value a Hydra sweeper (e.g. optuna) optimises
    return metrics.get("recall@1")


def cli(argv: list[str] | None = None, *, watchdog: bool = True) -> None:
    """`python -m vpt_dml.run`: what Hydra would answer with a traceback or would not
    complete, answered before it parses the command line. In process (the tests' exit
    codes and error lines): `cli(argv, watchdog=False)` arms no process-wide watchdog."""
    if argv is None:
        argv = sys.argv[1:]
    else:  # Hydra parses sys.argv
        sys.argv = [sys.argv[0], *argv]
    if watchdog:  # this process is the run: SIGTERM ends it in bounded time (watchdog.py)
        enable_watchdog()
    action = completion.requested(argv)
    if action:
        print(completion.script(action), end="")
        return
    try:
        check_command_line(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    cluster.pin_run_stamp()  # torchrun workers / a requeued SLURM job share one run folder
    main()


if __name__ == "__main__":
    cli()
