"""`python -m vpt_dml.run [+experiment=NAME] [overrides]`: train, evaluate, record.

Writes into the run folder (hydra.run.dir): checkpoints/, csv/metrics.csv,
metrics.json (final test metrics + how they were produced), config_resolved.yaml.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from vpt_dml.callbacks import ExactResume
from vpt_dml.callbacks.wandb_logger import finish_wandb
from vpt_dml.errors import UserError
from vpt_dml.models.backbone import data_config
from vpt_dml.models.build import prepare_backbone
from vpt_dml.module import VPTDMLModule
from vpt_dml.provenance import environment
from vpt_dml.summary import print_summary

log = logging.getLogger("vpt_dml")
# faiss logs each missing CPU-specific build it probes (avx512, avx2) as an error-looking line
logging.getLogger("faiss.loader").setLevel(logging.WARNING)


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
    callbacks.append(ExactResume())  # not optional: a resumed run must equal a straight one
    # a logger factory may return None (W&B could not start): the others carry on
    loggers = [
        lg for c in (cfg.get("logger") or {}).values() if c and (lg := instantiate(c)) is not None
    ]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):  # the whole run config, not only the module's part
            lg.log_hyperparams(OmegaConf.to_container(cfg_without_hydra(cfg), resolve=True))
    return trainer


def cfg_without_hydra(cfg: DictConfig) -> DictConfig:
    return OmegaConf.create({k: v for k, v in cfg.items() if k != "hydra"})


def backbone_provenance(b: DictConfig) -> dict:
    """Which backbone, and where its weights came from."""
    out = {
        "name": b.name,
        "pretrained": bool(b.pretrained or b.weights),
        "weights": b.weights or ("timm hub" if b.pretrained else "random init"),
    }
    if b.get("synthetic_pretraining") and b.weights:
        out["made_by"] = "vpt_dml synthetic pretraining on generated classes outside the dataset"
    return out


def refuse_ddp_sweep(cfg: DictConfig) -> None:
    """`-m` with a multi-device DDP strategy makes every child launch its own sweep."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    strategy = str(cfg.trainer.get("strategy", "auto"))
    devices = cfg.trainer.get("devices", 1)
    many = (
        devices in (-1, "-1", "auto")
        or (isinstance(devices, int) and devices > 1)
        or (isinstance(devices, str) and "," in devices)
    )
    if "ddp" in strategy and many:
        raise UserError(
            f"a sweep (-m) cannot run trainer.strategy={strategy} on devices={devices}: launch one DDP "
            "job per process instead (a shell loop over the values, see the README)"
        )


def train(cfg: DictConfig) -> dict:
    refuse_ddp_sweep(cfg)
    if cfg.get("seed") is not None:  # seed 0 is a seed
        L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    dm = build_datamodule(cfg)
    splits = dm.load()
    module = build_module(cfg, splits.train.num_classes, dm.recall_ks)
    # Preprocessing follows the backbone's own pretrained config (size, mean, std).
    pre = data_config(module.embedder.backbone.vit)
    dm.image_size, dm.mean, dm.std = pre["image_size"], pre["mean"], pre["std"]
    trainer = build_trainer(cfg)

    before = {}
    if cfg.get("eval_before_training", True):
        before = trainer.validate(module, datamodule=dm, verbose=False)[0]
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    test = trainer.test(module, datamodule=dm, verbose=False)[0]

    metrics = {k.removeprefix("test/"): float(v) for k, v in test.items()}
    if before:
        metrics["recall@1_before"] = float(before["val/recall@1"])
    ckpt_cb = trainer.checkpoint_callback
    result = {
        "metrics": metrics,
        "best_epoch": {
            "note": "best validation-split epoch; equals the best *test* epoch when data.val_classes=0",
            "val/recall@1": float(ckpt_cb.best_model_score)
            if ckpt_cb and ckpt_cb.best_model_score is not None
            else None,
            "checkpoint": ckpt_cb.best_model_path if ckpt_cb else None,
        },
        "provenance": {
            **environment(),
            "seed": cfg.get("seed"),
            "task_name": cfg.get("task_name"),
            "overrides": list(HydraConfig.get().overrides.task)
            if HydraConfig.initialized()
            else [],
            "dataset": {"name": dm.name, "root": str(dm.root), **dm.count_report},
            "backbone": backbone_provenance(cfg.model.backbone),
            "parameters": getattr(module, "parameter_summary", None),
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
        },
    }
    if trainer.is_global_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        (out_dir / "config_resolved.yaml").write_text(
            OmegaConf.to_yaml(cfg_without_hydra(cfg), resolve=True)
        )
        print_summary(result, out_dir)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        finish_wandb()  # the next job of a sweep opens its own W&B run
    # the value a Hydra sweeper (e.g. optuna) optimises
    return metrics.get("recall@1")


if __name__ == "__main__":
    main()
