"""`train(cfg, make_trainer)`: the recipe of one run, in the order it happens.

Seed, data, model, the evaluation before training, fit, test. Everything around it (the
run folder, resume, the Trainer's mandatory callbacks, SIGTERM, divergence, metrics.json)
belongs to `vpt_dml/runs/` (runs/lifecycle.py calls this), which hands the recipe a
Trainer factory and a check of the built model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vpt_dml.models.backbone import data_config
from vpt_dml.models.build import prepare_backbone
from vpt_dml.module import VPTDMLModule


@dataclass
class Built:
    """What the recipe has built so far; filled as it goes, so that whoever records an
    interrupted or diverged run sees what exists."""

    datamodule: Any = None
    module: VPTDMLModule | None = None
    trainer: L.Trainer | None = None
    before: dict = field(default_factory=dict)  # the evaluation before training
    last_epoch: int = -1  # the last trained epoch (0-based)


def train(
    cfg: DictConfig,
    make_trainer: Callable[[DictConfig], tuple[L.Trainer, Any]],
    check_model: Callable[[VPTDMLModule], None] | None = None,
    evaluate_before: bool = True,
    built: Built | None = None,
) -> Built:
    """`make_trainer(cfg)`: the Trainer and the ModelCheckpoint that keeps the best epoch
    (None without one); `check_model`: runs on the built model before any evaluation (a
    resume's checkpoint must fit it); `evaluate_before`: False for a resume, which keeps
    its checkpoint's evaluation before training."""
    built = built if built is not None else Built()
    if cfg.get("seed") is not None:  # seed 0 is a seed
        L.seed_everything(cfg.seed, workers=True)
    built.datamodule = dm = build_datamodule(cfg)
    splits = dm.load()
    built.module = module = build_module(cfg, splits.train.num_classes, dm.recall_ks)
    if check_model is not None:
        check_model(module)
    # Preprocessing follows the backbone's own pretrained config (size, mean, std).
    pre = data_config(module.embedder.backbone.vit)
    dm.set_preprocessing(pre["image_size"], pre["mean"], pre["std"])
    if (cfg.get("eval") or {}).get("per_query", True):  # per_query/*.parquet (evidence)
        module.per_query_dir = Path(cfg.paths.output_dir)
        module.per_query_held_out = bool(dm.val_classes)
    trainer, selector = make_trainer(cfg)
    built.trainer = trainer

    if evaluate_before and cfg.get("eval_before_training", True):
        module.eval_label = "before"  # logged as before/<metric>, not as an epoch's val/
        try:
            built.before = trainer.validate(module, datamodule=dm, verbose=False)[0]
        finally:
            module.eval_label = None
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    built.last_epoch = trainer.current_epoch - 1
    # held-out protocol: the test split is evaluated once, on the selected checkpoint
    best = (selector.best_model_path or None) if selector is not None else None
    trainer.test(module, datamodule=dm, verbose=False, ckpt_path=best if dm.val_classes else None)
    return built


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
