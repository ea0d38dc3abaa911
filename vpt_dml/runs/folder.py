"""A run folder belongs to one run.

`claim()` runs before anything is written into `hydra.run.dir` (a Hydra callback, so even
before Hydra's own `.hydra/` files) and again when `train()` starts (`owns_run_folder`, for
in-process use too; the lock is released when `train()` ends):

- the folder must be creatable and writable (one-line error otherwise);
- `run.lock` (PID, host, process start time, SLURM job) is created with O_EXCL: a second
  run into a folder whose lock is held stops; a stale lock (its PID no longer runs on this
  host, or an earlier incarnation of the same requeued SLURM job) is taken over with a warning;
- a folder that holds an earlier run's `metrics.json` or checkpoints is refused, unless this
  run resumes it (`ckpt_path` inside the folder, or a requeued SLURM job finding its
  `checkpoints/last.ckpt`) or `overwrite=true` (the earlier run's results are deleted first);
- only rank zero claims (RANK / LOCAL_RANK / NODE_RANK / GROUP_RANK / SLURM_PROCID, as set by
  Lightning's DDP children, torchrun and srun); the other ranks write nothing here;
- a sweep folder is continued job by job (vpt_dml/runs/cluster.py `continue_in_folder`).

`config_resolved.yaml` is written at start, so a killed run can still be exported, and the
CSV history (`csv/metrics.csv`) is appended to when a run resumes in its own folder.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from vpt_dml.distributed import is_global_zero
from vpt_dml.errors import UserError
from vpt_dml.runs import cluster
from vpt_dml.runs.provenance import cfg_without_hydra
from vpt_dml.runs.record import Status, status_of

LOCK = "run.lock"
KEY = "hydra.run.dir"
# Free space a run needs before it starts: Hydra's .hydra/ files, run.log, run.lock and
# config_resolved.yaml (~20 kB on 4 kB blocks), with room to spare; Hydra's own writes
# would end in its traceback (checkpoints are announced by checkpoint_io.DiskSpaceCheck).
START_FREE_BYTES = 256 * 2**10
# What an earlier run leaves that a new run would overwrite (deleted by overwrite=true).
RESULTS = ("metrics.json", "config_resolved.yaml", "checkpoints", "csv", "images", "per_query")
_held: set[Path] = set()  # locks this process holds, released at exit


# -- writable -----------------------------------------------------------------------------
def make_folder(folder: Path, key: str = KEY) -> None:
    """Create `folder` (and parents) or stop in one line saying why it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next(
            (p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None
        )
        where = f"{blocker} is a file, not a folder" if blocker else "a part of it is not a folder"
        raise UserError(f"{key}={folder} cannot be created: {where}; give another {key}") from None
    except OSError as e:
        raise UserError(
            f"{key}={folder} cannot be created ({e.strerror or e}); give a folder you can write to"
        ) from None
    if not folder.is_dir():  # mkdir(exist_ok) accepts an existing file on some systems
        raise UserError(f"{key}={folder} is a file, not a folder; give another {key}")
    free = shutil.disk_usage(folder).free
    if free < START_FREE_BYTES:
        raise UserError(
            f"{key}={folder} has {free / 2**10:,.0f} KiB free: a run needs at least "
            f"{START_FREE_BYTES // 2**10} KiB to start (and room for its checkpoints); free "
            f"space there or give another {key}"
        )


# -- lock -------------------------------------------------------------------------------
def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (Linux): tells a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _record() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "process_start": _start_time(os.getpid()),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def _read_lock(lock: Path) -> dict | None:
    """The lock's record; None when there is no lock, {} when it cannot be read."""
    for attempt in range(2):
        try:
            data = json.loads(lock.read_text())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            if attempt == 0:
                time.sleep(0.2)  # another run may be writing it right now
    return {}


def _is_mine(rec: dict) -> bool:
    return rec.get("pid") == os.getpid() and rec.get("host") == socket.gethostname()


def _alive(rec: dict) -> bool | None:
    """Whether the lock's holder still runs: True / False, or None when this host cannot tell."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and rec.get("slurm_job") == job:
        if rec.get("slurm_restart") != os.environ.get("SLURM_RESTART_COUNT", "0"):
            return False  # an earlier incarnation of this requeued job
    if rec.get("host") != socket.gethostname() or not isinstance(rec.get("pid"), int):
        # another node: SLURM knows whether the lock's job still runs (a resumed sweep)
        return cluster.slurm_job_alive(rec.get("slurm_job")) if job else None
    pid = rec["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    started = _start_time(pid)
    return not (rec.get("process_start") and started and started != rec["process_start"])


def _holder(rec: dict) -> str:
    return f"PID {rec.get('pid', '?')} on {rec.get('host', '?')}, started {rec.get('started_utc', '?')}"


def _check_lock(folder: Path, key: str) -> dict | None:
    """The lock's record when it is stale, None when free or ours; raises when it is held."""
    lock = folder / LOCK
    rec = _read_lock(lock)
    if rec is None or _is_mine(rec):
        return None
    alive = _alive(rec) if rec else None
    if alive:
        raise UserError(
            f"{key}={folder} is in use by another run ({_holder(rec)}); wait for it to end "
            f"or give another {key}"
        )
    if alive is None:
        raise UserError(
            f"{key}={folder} is locked by {_holder(rec) if rec else 'an unreadable ' + LOCK}, "
            f"which this host cannot check; if that run has ended, delete {lock} and start again"
        )
    return rec


def _take_lock(folder: Path, key: str) -> None:
    lock = folder / LOCK
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            rec = _read_lock(lock)
            if rec is None:  # released in between
                continue
            if _is_mine(rec):
                _held.add(lock)
                return
            stale = _check_lock(folder, key)
            if stale is None:
                continue
            # rename first: of two runs taking over the same stale lock only one succeeds
            aside = folder / f"{LOCK}.stale.{os.getpid()}"
            try:
                os.rename(lock, aside)
            except FileNotFoundError:
                continue
            aside.unlink(missing_ok=True)
            print(
                f"warning: took over the stale lock of {folder}: {_holder(stale)} is no longer running",
                file=sys.stderr,
            )
            continue
        except OSError as e:
            raise UserError(
                f"{key}={folder} is not writable ({e.strerror or e}); give a folder you can write to"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(_record(), f, indent=1)
        _held.add(lock)
        return
    raise UserError(f"{key}={folder}: could not take {lock}; another run is starting there")


@atexit.register
def release_all() -> None:
    for lock in list(_held):
        release(lock.parent)


def release(folder: str | Path) -> None:
    """Remove this process's lock from `folder` (a lock of another process is left alone)."""
    lock = Path(folder) / LOCK
    _held.discard(lock)
    rec = _read_lock(lock)
    if rec and _is_mine(rec):
        lock.unlink(missing_ok=True)


# -- earlier runs -----------------------------------------------------------------------
def earlier_run(folder: Path) -> str | None:
    """What an earlier run left in `folder`, in words; None when it holds none."""
    status = status_of(folder)
    if status is not None:
        return f"an {status} run" if status == Status.INTERRUPTED else "a finished run"
    if any((folder / "checkpoints").glob("*.ckpt")):
        return "checkpoints of an earlier run"
    return None


def resumes_here(folder: Path, ckpt_path: str | None) -> bool:
    """This run continues the folder's own run: its checkpoint, or a requeued SLURM job's
    last.ckpt (the one resume path: vpt_dml/runs/cluster.py)."""
    if ckpt_path:
        try:
            Path(ckpt_path).expanduser().resolve().relative_to(folder.resolve())
            return True
        except ValueError:
            return False
    requeued = cluster.in_slurm_job() and cluster.restart_count() > 0
    return requeued and (folder / "checkpoints" / "last.ckpt").is_file()


def clear_results(folder: Path) -> None:
    removed = []
    for name in RESULTS:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
            removed.append(name + "/")
        elif path.exists():
            path.unlink()
            removed.append(name)
    if removed:
        print(f"warning: overwrite=true: deleted {', '.join(removed)} in {folder}", file=sys.stderr)


def claim(
    folder: str | Path, ckpt_path: str | None = None, overwrite: bool = False, key: str = KEY
) -> None:
    """Make `folder` this run's own, or stop in one line (see the module docstring)."""
    if not is_global_zero():
        return
    folder = Path(os.path.abspath(Path(folder).expanduser()))
    make_folder(folder, key)
    _check_lock(folder, key)  # a live run's folder is refused before anything else
    earlier = earlier_run(folder)
    resume = resumes_here(folder, ckpt_path)
    if earlier and not resume and not overwrite:
        raise UserError(
            f"{key}={folder} already holds {earlier}; give another {key}, or continue it with "
            f"ckpt_path={folder / 'checkpoints' / 'last.ckpt'}, or replace it with overwrite=true"
        )
    _take_lock(folder, key)
    if earlier and overwrite and not resume:
        clear_results(folder)


# -- at the top of train() ----------------------------------------------------------------
def prepare(cfg: DictConfig) -> Path:
    """Claim cfg.paths.output_dir and write config_resolved.yaml into it; returns the folder."""
    folder = Path(cfg.paths.output_dir)
    claim(folder, cfg.get("ckpt_path"), bool(cfg.get("overwrite", False)))
    if is_global_zero():
        try:
            (folder / "config_resolved.yaml").write_text(
                OmegaConf.to_yaml(cfg_without_hydra(cfg), resolve=True)
            )
        except OSError as e:  # a full disk or quota: one line, the lock given back
            release(folder)
            raise UserError(
                f"cannot write {folder / 'config_resolved.yaml'} ({e.strerror or e}); free "
                "space there or give another hydra.run.dir"
            ) from None
    return folder


def owns_run_folder(train_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorates train(cfg): the folder is claimed before it and released when it returns
    or raises (in-process runs too: a notebook's finished run does not keep the lock)."""

    @functools.wraps(train_fn)
    def wrapper(cfg: DictConfig, *args: Any, **kwargs: Any) -> Any:
        folder = prepare(cfg)
        try:
            return train_fn(cfg, *args, **kwargs)
        finally:
            release(folder)

    return wrapper


# -- before Hydra writes into the folder ----------------------------------------------------
def _stop(config: DictConfig, error: UserError) -> None:
    if config.get("debug") or os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


class ClaimRunFolder(Callback):
    """Hydra callback: claims hydra.run.dir before Hydra writes .hydra/ and the job log there."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            claim(
                str(config.hydra.run.dir),
                config.get("ckpt_path"),
                bool(config.get("overwrite", False)),
            )
        except UserError as e:
            _stop(config, e)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_global_zero():
            return
        # A sweep folder with earlier results is continued, job by job (cluster.py: a
        # finished job of the same config is skipped, an interrupted one resumes).
        key = "hydra.sweep.dir"
        sweep = Path(os.path.abspath(str(config.hydra.sweep.dir)))
        try:
            make_folder(sweep, key)
            cluster.check_launcher_resources(config)
        except UserError as e:
            _stop(config, e)
