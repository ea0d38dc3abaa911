"""What a result needs to say about how it was produced."""

from __future__ import annotations

import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

import vpt_dml


def git_state() -> dict[str, str | bool | None]:
    here = Path(vpt_dml.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(dirty) if commit else None}


def environment() -> dict:
    return {
        "vpt_dml": vpt_dml.__version__,
        **{f"git_{k}": v for k, v in git_state().items()},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def cfg_without_hydra(cfg: DictConfig) -> DictConfig:
    """The run's config without the `hydra` node (it needs a live Hydra job to resolve)."""
    return OmegaConf.create({k: v for k, v in cfg.items() if k != "hydra"})
