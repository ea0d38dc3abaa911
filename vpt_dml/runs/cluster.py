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

STAMP_ENV = "VPT_RUN_STAMP"
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


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


def lightning_child_rank() -> bool:
    """This process is a rank > 0 that Lightning's subprocess launcher started (it re-runs
    the command line with `hydra.job.name=train_ddp_process_<rank>` added); not torchrun,
    srun or submitit, whose launchers read every rank's exit code."""
    return "LOCAL_RANK" in os.environ and any(
        a.startswith("hydra.job.name=train_ddp_process_") for a in sys.argv
    )


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


def _job_log(output_dir: str, job_name: str) -> str:
    """Hydra's job log file (conf/hydra/default.yaml): `<run dir>/<job name>.log` (run.log)
    for rank 0 only. Lightning re-runs the command line for each further DDP rank with
    `hydra.job.name=train_ddp_process_<rank>`, which left `train_ddp_process_1.log` beside
    run.log; those ranks print to the console (the same stderr) and log to no file."""
    from vpt_dml.distributed import is_global_zero  # torch: once a run is certain

    if not is_global_zero():
        return os.devnull
    return str(Path(output_dir) / f"{job_name}.log")


if not OmegaConf.has_resolver("vpt_job_log"):
    OmegaConf.register_new_resolver("vpt_job_log", _job_log)


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
    if _requeue.signum is None:
        return None
    from vpt_dml.distributed import is_global_zero

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
