"""Shared fixtures: tiny configs composed from the real conf/ tree, no network."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A ViT small enough for 2 CPU cores; the same timm class as the paper's backbones.
TINY_BACKBONE = [
    "model.backbone.name=vit_tiny_patch16_224",
    "model.backbone.pretrained=false",
    "model.backbone.weights=null",
    "++model.backbone.synthetic_pretraining=null",
    "++model.backbone.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
    "model.embed_dim=16",
]
TINY_DATA = [
    "data=synthetic",
    "data.synthetic.num_classes=8",
    "data.synthetic.images_per_class=6",
    "data.synthetic.image_size=32",
    "data.batch_size=8",
    "data.samples_per_class=2",
    "data.num_workers=0",
    "data.eval_batch_size=64",
]
TINY_TRAINER = [
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.precision=32-true",
    "trainer.devices=1",
    "trainer.strategy=auto",
    "logger=csv",
]


def compose_config(
    overrides: list[str], tmp_path: Path, experiment: str | None = None
) -> DictConfig:
    """Compose conf/train.yaml as `python -m vpt_dml.run` would, with paths in tmp_path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        extra = [f"+experiment={experiment}"] if experiment else []
        cfg = compose("train", overrides=extra + overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(REPO)
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    return cfg


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def tiny_overrides(*extra: str) -> list[str]:
    """The tiny settings, with any key that `extra` sets again left to `extra`."""
    replaced = {_key(o) for o in extra}
    base = [o for o in TINY_BACKBONE + TINY_DATA + TINY_TRAINER if _key(o) not in replaced]
    return base + list(extra)


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> DictConfig:
    return compose_config(tiny_overrides(), tmp_path)


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600):
    """Run `python -m vpt_dml.run ...` in a subprocess (for CLI / DDP / sweep tests)."""
    import subprocess

    full_env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "vpt_dml.run", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def resolved(cfg: DictConfig) -> dict:
    """The run's config as plain data (the `hydra` node left out: it needs a live job)."""
    from vpt_dml.runs.provenance import cfg_without_hydra

    return OmegaConf.to_container(cfg_without_hydra(cfg), resolve=True)


def bare_trainer(tmp_path: Path, **settings):
    """A Lightning Trainer on CPU with nothing around the loop (no logger, checkpoints,
    model summary or sanity check); `settings` add or override Trainer arguments."""
    import lightning as L

    base = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**base, **settings})


def load_experiment(name: str):
    """experiments/<name>.py imported as module `name` (scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module
