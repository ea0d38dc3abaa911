"""A sweep (`-m`) rerun into the same `hydra.sweep.dir`, or a requeued SLURM job: does this
job continue its folder's earlier run (runs/cluster.py's module docstring lists the cases)?

A finished job of the same config is skipped (`Skip`, the recall it returned then), an
interrupted one continues from its `last.ckpt`, one that never started runs, and a folder
that holds a run of another config is refused. The recorded status comes from
metrics.json through runs/record.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from vpt_dml.distributed import is_global_zero
from vpt_dml.errors import Skip, WrongSweepFolder
from vpt_dml.runs.cluster import in_slurm_job, restart_count
from vpt_dml.runs.provenance import cfg_without_hydra
from vpt_dml.runs.record import saved_recall, status_of

# keys that may differ between a job's first run and its continuation
_NOT_COMPARED = ("ckpt_path", "overwrite")


def _flat(node: Any, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out: dict = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def config_changes(folder: Path, cfg: DictConfig) -> list[str] | None:
    """Keys whose value differs from the run recorded in `folder` (None: no record)."""
    recorded = folder / "config_resolved.yaml"
    if not recorded.is_file():
        return None
    try:
        old = OmegaConf.to_container(OmegaConf.load(recorded), resolve=False)
    except Exception:  # noqa: BLE001 - an unreadable record is a changed one
        return ["config_resolved.yaml (unreadable)"]
    new = OmegaConf.to_container(cfg_without_hydra(cfg), resolve=True)
    a, b = _flat(old), _flat(new)
    return sorted(
        k
        for k in set(a) | set(b)
        if k.split(".")[0] not in _NOT_COMPARED and a.get(k, "<unset>") != b.get(k, "<unset>")
    )


def continue_in_folder(cfg: DictConfig) -> None:
    """Decides, before the run folder is claimed, whether this run continues its folder's
    earlier run (module docstring). Sets cfg.ckpt_path to resume; raises Skip for a finished
    sweep job; raises UserError when the folder holds a run of another config."""
    if cfg.get("ckpt_path") or cfg.get("overwrite", False):
        return
    folder = Path(os.path.abspath(str(cfg.paths.output_dir)))
    last = folder / "checkpoints" / "last.ckpt"
    sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    requeued = in_slurm_job() and restart_count() > 0
    if not (sweep or requeued):
        return
    status = status_of(folder)
    if status is None and not last.is_file():
        return  # never ran (or ran so briefly that nothing is left): run it
    # rank 0 alone compares (it rewrites config_resolved.yaml as soon as it claims the folder)
    changed = config_changes(folder, cfg) if is_global_zero() else None
    job = f"job {HydraConfig.get().job.num} " if sweep else ""
    if changed:
        shown = ", ".join(changed[:4]) + (" ..." if len(changed) > 4 else "")
        raise WrongSweepFolder(
            f"{job}folder {folder} holds a run of another config ({shown} differ); give "
            "another hydra.sweep.dir, or replace the earlier runs with overwrite=true"
        )
    if status in ("finished", "diverged"):
        if not sweep:
            return  # a requeued job that had finished: the run folder refuses it
        if status == "diverged":
            raise Skip(f"skipped: {job}diverged earlier in {folder}", None, failed=True)
        raise Skip(f"skipped: {job}finished earlier in {folder}", saved_recall(folder))
    if last.is_file():
        with _open(cfg):
            cfg.ckpt_path = str(last)
        why = f"SLURM restart {restart_count()}" if requeued else "sweep rerun"
        print(f"resuming: {job}continues from {last} ({why})", file=sys.stderr, flush=True)
        return
    # interrupted before any checkpoint: start it again
    with _open(cfg):
        cfg.overwrite = True


def _open(cfg: DictConfig):
    return open_dict(cfg)
