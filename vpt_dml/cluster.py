"""Runs started by a cluster: submitit sweeps, torchrun / srun process groups, SLURM requeue.

One resume path. A run continues from its own `<run dir>/checkpoints/last.ckpt` (written
by the suite at every epoch end, exact: ExactResume) in three cases, all decided here:

- `ckpt_path=...last.ckpt` given by hand (the run folder accepts it);
- a SLURM job that was requeued (`SLURM_RESTART_COUNT` > 0) finds `last.ckpt` in its run
  folder: it resumes from it without being told;
- a sweep (`-m`) rerun into the same `hydra.sweep.dir`: each job whose folder holds a
  finished run of the same config is skipped, an interrupted one continues from its
  `last.ckpt`, a job that never started runs.

Lightning's own SLURM requeue (SIGUSR1 -> `hpc_ckpt_N.ckpt` -> `scontrol requeue`) is not
used: its checkpoint is written mid-epoch, outside ExactResume's epoch-end state, and a
second checkpoint kind would be a second resume path. Instead, under SLURM, SIGUSR1 (plain
`sbatch --signal=USR1@T`, Lightning's convention) and SIGUSR2 (submitit's `signal_delay_s`)
stop the run as SIGTERM does (last.ckpt, metrics.json "interrupted"), and then the run
requeues its own job with `scontrol requeue`. Installing the handler before the Trainer
starts also keeps Lightning from installing its hpc handler (it only takes a free signal).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vpt_dml.errors import UserError
from vpt_dml.provenance import cfg_without_hydra

STAMP_ENV = "VPT_RUN_STAMP"
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
# keys that may differ between a job's first run and its continuation
_NOT_COMPARED = ("ckpt_path", "overwrite")


# -- where the run comes from ---------------------------------------------------------------
def in_slurm_job() -> bool:
    """A batch job of SLURM (not an interactive `salloc` shell, as Lightning decides it)."""
    return bool(os.environ.get("SLURM_JOB_ID")) and os.environ.get("SLURM_JOB_NAME") not in (
        "bash",
        "interactive",
    )


def restart_count() -> int:
    value = os.environ.get("SLURM_RESTART_COUNT", "0").strip()
    return int(value) if value.isdigit() else 0


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes: an array task is `<array job>_<task>`."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def external_world_size() -> int:
    """Processes started by torchrun or srun for one run (1 when Lightning starts them)."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit():
            return int(value)
    return 1


def launcher_kind(hydra_cfg: Any) -> str | None:
    """The submitit launcher of this sweep ("slurm" or "local"); None for Hydra's own."""
    target = str(OmegaConf.select(hydra_cfg, "launcher._target_", default="") or "")
    if "submitit_launcher" not in target:
        return None
    return "slurm" if target.endswith("SlurmLauncher") else "local"


def jobs_are_processes() -> bool:
    """Each job of this sweep runs in its own process (so DDP inside a job is fine)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and launcher_kind(HydraConfig.get()) is not None


# -- one run folder for all processes and for the requeued job ------------------------------
def _process_start(pid: int) -> float | None:
    """Wall-clock start time of a process (Linux /proc), None when it cannot be read."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19])
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def run_stamp(environ: dict | None = None, parent_start: float | None = None) -> str | None:
    """The default run folder's last part when the time of day would not be shared:

    - SLURM: `slurm-<job id>` (a requeued job keeps its id, so it finds its folder; every
      task of the job, on every node, computes the same name);
    - torchrun with a rendezvous id (multi-node): `torchrun-<id>`;
    - torchrun on one node: the start time of torchrun itself (the workers' parent), in
      the usual format, instead of each worker's own clock.
    None: Hydra's `${now:...}` as usual."""
    env = os.environ if environ is None else environ
    job = env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID")
    if job and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        task = env.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{job}" + (f"_{task}" if env.get("SLURM_ARRAY_JOB_ID") and task else "")
    if "TORCHELASTIC_RUN_ID" in env and env.get("LOCAL_RANK") is not None:
        rdzv = env["TORCHELASTIC_RUN_ID"]
        if rdzv and rdzv != "none":
            return f"torchrun-{rdzv}"
        start = parent_start if parent_start is not None else _process_start(os.getppid())
        if start is not None:
            return datetime.fromtimestamp(start).strftime("%Y-%m-%d_%H-%M-%S")
    return None


def pin_run_stamp() -> None:
    """Called by `python -m vpt_dml.run` before Hydra starts: conf/hydra/default.yaml's
    run.dir reads VPT_RUN_STAMP (and falls back to the time of day)."""
    if STAMP_ENV not in os.environ and (stamp := run_stamp()) is not None:
        os.environ[STAMP_ENV] = stamp


# -- the launcher's resources ---------------------------------------------------------------
def _gpus_per_node(accelerator: Any, devices: Any) -> int | None:
    if str(accelerator) == "cpu":
        return None  # CPU processes: ask for tasks, not GPUs
    return devices if isinstance(devices, int) and devices > 0 else None


def _cpus_per_task(num_workers: Any) -> int:
    # the training process and its DataLoader workers
    return (num_workers if isinstance(num_workers, int) and num_workers > 0 else 0) + 1


if not OmegaConf.has_resolver("vpt_gpus_per_node"):
    OmegaConf.register_new_resolver("vpt_gpus_per_node", _gpus_per_node)
if not OmegaConf.has_resolver("vpt_cpus_per_task"):
    OmegaConf.register_new_resolver("vpt_cpus_per_task", _cpus_per_task)


def check_launcher_resources(config: DictConfig) -> None:
    """Before a submitit sweep starts: the trainer's devices must be a count of devices,
    since the processes (one task per device) and GPUs per node are derived from it."""
    kind = launcher_kind(config.hydra)
    if kind is None:
        return
    devices = OmegaConf.select(config, "trainer.devices")
    nodes = OmegaConf.select(config, "trainer.num_nodes", default=1)
    if not (isinstance(devices, int) and devices > 0):
        raise UserError(
            f"hydra/launcher={kind} starts one task per device, but trainer.devices="
            f"{devices} is not a count: give trainer.devices=N (the devices per node)"
        )
    if not (isinstance(nodes, int) and nodes > 0):
        raise UserError(
            f"trainer.num_nodes={nodes} is not a count of nodes: give trainer.num_nodes=N"
        )


def export_local_ranks() -> None:
    """submitit's local executor starts one task per device but says so only in its own
    variables: export RANK / LOCAL_RANK / WORLD_SIZE / MASTER_* so that Lightning joins the
    tasks into one process group instead of re-launching the job (it would re-run
    submitit's `_submit` command line)."""
    tasks = os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")
    if "SUBMITIT_LOCAL_JOB_ID" not in os.environ or not tasks.isdigit() or int(tasks) < 2:
        return
    if "LOCAL_RANK" in os.environ:
        return
    import submitit

    given = {k: os.environ[k] for k in ("MASTER_ADDR", "MASTER_PORT") if k in os.environ}
    submitit.helpers.TorchDistributedEnvironment().export(
        set_cuda_visible_devices=False, overwrite=True
    )
    os.environ.update(given)  # a port the user chose wins over submitit's pick


def enter_job(cfg: DictConfig) -> None:
    """At the top of `vpt_dml.run`'s main: ranks of a local submitit job, the run folder's
    earlier run (resume / skip / run), and SLURM's warning signal."""
    export_local_ranks()
    continue_in_folder(cfg)
    watch_requeue_signals()


# -- requeue --------------------------------------------------------------------------------
class _Requeue:
    signum: int | None = None


_requeue = _Requeue()


def _on_requeue_signal(signum: int, frame: Any) -> None:
    _requeue.signum = signum
    print(
        f"{signal.Signals(signum).name}: the time limit is near; saving and requeueing",
        file=sys.stderr,
        flush=True,
    )
    # stop as SIGTERM stops (Lightning's handler while a Trainer runs: it ends the loop at the
    # next batch, ExactResume keeps last.ckpt, run.py writes metrics.json "interrupted")
    handler = signal.getsignal(signal.SIGTERM)
    if callable(handler):
        handler(signal.SIGTERM, frame)
    else:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        raise SIGTERMException


def watch_requeue_signals() -> None:
    """Under a SLURM batch job: the warning signal before the time limit requeues the job."""
    if not in_slurm_job():
        return
    for signum in REQUEUE_SIGNALS:
        signal.signal(signum, _on_requeue_signal)


def requeue_signal_name() -> str | None:
    return signal.Signals(_requeue.signum).name if _requeue.signum else None


def requeue_if_asked() -> str | None:
    """After the run stopped and saved: `scontrol requeue` this job (rank 0 only); returns
    the line that says so, None when no requeue signal came."""
    from vpt_dml.run_folder import is_global_zero

    if _requeue.signum is None:
        return None
    job = slurm_job_id()
    if not is_global_zero() or not job:
        return None
    cmd = ["scontrol", "requeue", job]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"could not requeue SLURM job {job} ({e}); resubmit it: it resumes from last.ckpt"
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        return (
            f"`scontrol requeue {job}` failed ({why[-1] if why else done.returncode}); "
            "resubmit the job: it resumes from last.ckpt"
        )
    return f"requeued SLURM job {job}: it resumes from last.ckpt in the same run folder"


# -- continuing a run folder ----------------------------------------------------------------
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


def _status(folder: Path) -> str | None:
    import json

    path = folder / "metrics.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return "unreadable"
    return str(data.get("status", "finished")) if isinstance(data, dict) else "unreadable"


def _saved_recall(folder: Path) -> float | None:
    import json

    try:
        value = json.loads((folder / "metrics.json").read_text())["metrics"].get("recall@1")
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


class Skip(Exception):
    """This sweep job already finished; `.value` is what it returned then."""

    def __init__(self, message: str, value: float | None) -> None:
        super().__init__(message)
        self.value = value


def continue_in_folder(cfg: DictConfig) -> None:
    """Decides, before the run folder is claimed, whether this run continues its folder's
    earlier run (module docstring). Sets cfg.ckpt_path to resume; raises Skip for a finished
    sweep job; raises UserError when the folder holds a run of another config."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if cfg.get("ckpt_path") or cfg.get("overwrite", False):
        return
    folder = Path(os.path.abspath(str(cfg.paths.output_dir)))
    last = folder / "checkpoints" / "last.ckpt"
    sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    requeued = in_slurm_job() and restart_count() > 0
    if not (sweep or requeued):
        return
    status = _status(folder)
    if status is None and not last.is_file():
        return  # never ran (or ran so briefly that nothing is left): run it
    from vpt_dml.run_folder import is_global_zero

    # rank 0 alone compares (it rewrites config_resolved.yaml as soon as it claims the folder)
    changed = config_changes(folder, cfg) if is_global_zero() else None
    job = f"job {HydraConfig.get().job.num} " if sweep else ""
    if changed:
        shown = ", ".join(changed[:4]) + (" ..." if len(changed) > 4 else "")
        raise UserError(
            f"{job}folder {folder} holds a run of another config ({shown} differ); give "
            "another hydra.sweep.dir, or replace the earlier runs with overwrite=true"
        )
    if status in ("finished", "diverged"):
        if not sweep:
            return  # a requeued job that had finished: the run folder refuses it
        raise Skip(f"skipped: {job}finished earlier in {folder}", _saved_recall(folder))
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
    from omegaconf import open_dict

    return open_dict(cfg)


def slurm_job_alive(job: str | None) -> bool | None:
    """Whether SLURM still runs `job` (`squeue`): True / False, None when it cannot tell."""
    if not job:
        return None
    try:
        done = subprocess.run(
            ["squeue", "-h", "-j", str(job), "-o", "%T"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    states = done.stdout.split()
    if done.returncode != 0:
        # squeue refuses a job id it no longer knows
        return False if "Invalid job id" in done.stderr else None
    return any(
        s in ("RUNNING", "PENDING", "CONFIGURING", "COMPLETING", "SUSPENDED") for s in states
    )
