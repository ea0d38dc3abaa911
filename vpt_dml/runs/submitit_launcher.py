"""hydra/launcher=slurm: hydra-submitit-launcher's SLURM launcher, checked before it submits
and quiet while it waits.

Before sbatch: every job's composed config passes the run's own checks (a typo or
`optim.lr=-1` is refused in the terminal, not inside a queued job); the GPU request follows
the accelerator the job will run (`auto` on a partition without GPUs asks for none); the
request fits the partition (runs/slurm_limits.py). Each refusal is one `error:` line, exit 2,
as is sbatch's own refusal.

While waiting: job states come from `scontrol show job` every few seconds (submitit polls
`sacct`, which fails without accounting and warns at every poll). A requeued job (the time
limit, runs/cluster requeue) is waited for; a job that ends without a result (failed,
cancelled, timed out) ends the wait with one line per such job (its run folder, its last
error line) and exit 1. Finished jobs return their values to Hydra as before.

hydra/launcher=local (CheckedLocalLauncher): submitit's local executor, one process per
job, with the same ending: when the processes have ended, one `failed:` line per job
without a result and exit 1. (hydra-submitit-launcher's own waits 15 s per such job for a
result file that never comes, then ends the sweep with submitit's traceback.)
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as _base
from omegaconf import OmegaConf, open_dict

from vpt_dml.errors import UserError
from vpt_dml.runs import slurm_limits

POLL_ENV = "VPT_SLURM_POLL_S"  # seconds between two looks at the queue (default 10)
# hydra/launcher=local: the command that starts each job's Python (default: this
# interpreter), as submitit's LocalExecutor(python=...) takes it: a container's python, or
# the tests' tests/fork_exec.py
LOCAL_PYTHON_ENV = "VPT_LOCAL_PYTHON"
ENDED = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED",
}  # fmt: skip
# a pending job with one of these reasons never starts
NEVER_STARTS = ("PartitionConfig", "PartitionTimeLimit", "PartitionNodeLimit", "BadConstraints",
                "InvalidAccount", "InvalidQOS", "ReqNodeNotAvail, UnavailableNodes")  # fmt: skip


def _stop(line: str, code: int) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise UserError(line)
    print(f"error: {line}", file=sys.stderr, flush=True)
    sys.exit(code)


class CheckedSlurmLauncher(_base.SlurmLauncher):
    """Subclassed under hydra_plugins/vpt_dml_launcher (Hydra finds launchers only there)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        import submitit

        try:
            folders = self._check_jobs(job_overrides, initial_job_idx)
        except UserError as e:
            _stop(str(e), 2)
        params = dict(self.params)
        init = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init["slurm_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster="slurm", **init)
        args = _prepare(self, executor, params, folders, job_overrides, initial_job_idx)
        try:
            jobs = executor.map_array(self, *args)
        except Exception as e:  # noqa: BLE001 - submitit wraps sbatch's refusal in its own error
            _stop(f"sbatch refused the jobs: {_sbatch_message(e)}", 2)
        print(
            f"[slurm] submitted {len(jobs)} job(s) as array {jobs[0].job_id.split('_')[0]}; "
            f"logs in {init['folder'].replace('%j', '<job id>')}",
            file=sys.stderr,
            flush=True,
        )
        states = wait(jobs)
        return collect(jobs, states, list(folders.values()))

    def _check_jobs(self, job_overrides, initial_job_idx: int) -> dict[int, str]:
        """Every job's composed config passes the run's checks; the GPU request follows the
        accelerator; the request fits the partition. Returns {job number: run folder}."""
        from vpt_dml.runs.config_schema import check_config

        folders: dict[int, str] = {}
        accelerators = set()
        with contextlib.closing(job_configs(self, job_overrides, initial_job_idx)) as jobs:
            for num, overrides, cfg, folder in jobs:
                folders[num] = folder
                job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
                try:
                    check_config(job)
                except UserError as e:
                    raise UserError(f"job {num} ({' '.join(overrides)}): {e}") from None
                accelerators.add(
                    (
                        str(OmegaConf.select(job, "trainer.accelerator", default="auto")),
                        OmegaConf.select(job, "trainer.devices", default=1),
                    )
                )
        raw = OmegaConf.to_container(self.config.hydra.launcher, resolve=False)
        derived = "vpt_gpus_per_node" in str(raw.get("gpus_per_node"))
        part = slurm_limits.read_partition(self.params.get("partition"))
        if derived:
            wanted = {slurm_limits.gpus_for(a, d, part) for a, d in accelerators}
            if len(wanted) > 1:
                raise UserError(
                    "the jobs of one sweep share one sbatch request, but their "
                    "trainer.accelerator/devices ask for different GPUs: sweep them in "
                    "separate commands, or give hydra.launcher.gpus_per_node=N"
                )
            self.params["gpus_per_node"] = wanted.pop()
        if part is not None:
            slurm_limits.check_request(self.params, part)
        return folders


class CheckedLocalLauncher(_base.LocalLauncher):
    """Subclassed under hydra_plugins/vpt_dml_launcher (Hydra finds launchers only there)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        import submitit

        with contextlib.closing(job_configs(self, job_overrides, initial_job_idx)) as jobs:
            folders = {num: folder for num, _, _, folder in jobs}
        params = dict(self.params)
        executor = submitit.AutoExecutor(
            cluster="local",
            folder=params.pop("submitit_folder"),
            local_python=os.environ.get(LOCAL_PYTHON_ENV) or None,
        )
        params.pop("max_num_timeout", None)
        args = _prepare(self, executor, params, folders, job_overrides, initial_job_idx)
        jobs = executor.map_array(self, *args)
        while not all(job.done() for job in jobs):
            time.sleep(0.2)
        return collect(jobs, {job.job_id: _exit_state(job) for job in jobs}, list(folders.values()))


def _prepare(launcher, executor, params: dict, folders: dict, job_overrides, initial_job_idx):
    """The executor's parameters (Hydra's names, the cluster's own prefixed as submitit
    wants them), the sweep folder, one line per job; returns map_array's argument lists."""
    kind = executor.cluster
    base = set(OmegaConf.structured(_base.BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"{kind}_{k}": v for k, v in params.items()})
    Path(str(launcher.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    for num, o in zip(folders, job_overrides):
        print(f"[{kind}] #{num} : {' '.join(filter_overrides(o))}", file=sys.stderr)
    args = [
        (list(o), "hydra.sweep.dir", initial_job_idx + i, f"job_id_for_{initial_job_idx + i}",
         Singleton.get_state())
        for i, o in enumerate(job_overrides)
    ]  # fmt: skip
    return list(zip(*args))


def _exit_state(job) -> str:
    """How a local job ended, for its `failed:` line: submitit's controller exits 0 whatever
    its task's exit code (the task's `error:` line says why)."""
    code = job._process.returncode if job._process is not None else None
    return f"killed by signal {-code}" if code is not None and code < 0 else "no result"


def job_configs(launcher, job_overrides, initial_job_idx: int):
    """(job number, its overrides, its config, its run folder) for each job of the sweep,
    composed as the job will compose it; HydraConfig holds that job's config while the
    caller looks, and the sweep's again once closed (contextlib.closing)."""
    loader = launcher.hydra_context.config_loader
    saved = HydraConfig.instance().cfg
    try:
        for i, overrides in enumerate(job_overrides):
            num = initial_job_idx + i
            cfg = loader.load_sweep_config(launcher.config, list(overrides))
            with open_dict(cfg):
                cfg.hydra.job.num = num
                cfg.hydra.job.id = f"job_id_for_{num}"
                folder = str(Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir))
                cfg.hydra.runtime.output_dir = os.path.abspath(folder)
            HydraConfig.instance().set_config(cfg)
            yield num, overrides, cfg, folder
    finally:
        HydraConfig.instance().cfg = saved


def _sbatch_message(e: Exception) -> str:
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower() and ln.strip()]
    sbatch = [ln for ln in lines if ln.startswith("sbatch:")]
    chosen = sbatch or lines or [text.strip().splitlines()[-1] if text.strip() else repr(e)]
    return "; ".join(dict.fromkeys(ln.removeprefix("sbatch: error: ") for ln in chosen))


# -- waiting without accounting -------------------------------------------------------------
def _job_states(array_id: str) -> dict[str, tuple[str, str]] | None:
    """{task id: (state, reason)} of an array job from `scontrol show job`; None when
    SLURM no longer knows the job (it ended more than MinJobAge ago)."""
    import subprocess

    try:
        done = subprocess.run(
            ["scontrol", "-o", "show", "job", array_id], capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if done.returncode != 0:
        return None if "Invalid job id" in done.stderr else {}
    out = {}
    for line in done.stdout.splitlines():
        kv = dict(f.split("=", 1) for f in line.split() if "=" in f)
        task = kv.get("ArrayTaskId", "0")
        if "-" in task or "," in task or "%" in task:  # tasks not started yet, in one record
            continue
        reason = line.split("Reason=", 1)[1].split(" Dependency=")[0] if "Reason=" in line else ""
        out[task] = (kv.get("JobState", "UNKNOWN"), reason)
    return out


def wait(jobs: list) -> dict[str, str]:
    """Until every job has ended (its result written, or SLURM says it ended): the final
    state of each job id."""
    poll = float(os.environ.get(POLL_ENV, "10"))
    array_id = jobs[0].job_id.split("_")[0]
    final: dict[str, str] = {}
    while True:
        states = _job_states(array_id)
        for job in jobs:
            if job.job_id in final:
                continue
            task = job.job_id.split("_")[-1] if "_" in job.job_id else "0"
            state, reason = (states or {}).get(task, ("", ""))
            if job.paths.result_pickle.exists() and state not in ("RUNNING", "COMPLETING"):
                final[job.job_id] = "COMPLETED"
            elif states is None:
                final[job.job_id] = "ENDED"  # forgotten by SLURM: no result was written
            elif state in ENDED:
                final[job.job_id] = state
            elif state == "PENDING" and reason.startswith(NEVER_STARTS):
                final[job.job_id] = f"PENDING ({reason}: it can never start; scancel {job.job_id})"
        if len(final) == len(jobs):
            return final
        time.sleep(poll)


def collect(jobs: list, states: dict[str, str], folders: list[str]) -> list[JobReturn]:
    """Hydra's JobReturns of the finished jobs; one line per job without one, exit 1."""
    from submitit.core.utils import pickle_load

    returns, failed = [], []
    for job, folder in zip(jobs, folders):
        result = None
        if job.paths.result_pickle.exists():
            try:
                outcome, result = pickle_load(job.paths.result_pickle)
            except Exception:  # noqa: BLE001 - half-written: the job's log says more
                outcome = "error"
            if outcome != "success":
                result = None
        if isinstance(result, JobReturn) and result.status == JobStatus.COMPLETED:
            returns.append(result)
            continue
        why = _last_error_line(job.paths.stderr, job.paths.stdout)
        if isinstance(result, JobReturn) and result.status == JobStatus.FAILED:
            why = f"{type(result._return_value).__name__}: {result._return_value}"
        state = states.get(job.job_id, "ENDED")
        failed.append(f"failed: job {job.job_id} ({state}) in {folder}: {why or 'no error line'}")
    if failed:
        for line in failed:
            print(line, file=sys.stderr)
        _stop(
            f"{len(failed)} of {len(jobs)} job(s) did not finish (lines above; logs in "
            f"{jobs[0].paths.folder}); run the same command again to resume them",
            1,
        )
    return returns


def _last_error_line(*logs: Path) -> str | None:
    """The job's own last `error:` / `interrupted:` / `diverged:` line, else the last line
    that reads as an error (an exception, slurmstepd's CANCELLED / TIME LIMIT)."""
    lines = []
    for log in logs:
        try:
            lines += [ln.strip() for ln in Path(log).read_text(errors="replace").splitlines()]
        except OSError:
            continue
    ours = [ln for ln in lines if ln.startswith(("error:", "interrupted:", "diverged:"))]
    if ours:
        return ours[-1]
    others = [
        ln
        for ln in lines
        if ln.startswith("slurmstepd: error:")
        or ("Error" in ln.split(":", 1)[0] and not ln.startswith("File "))
    ]
    return others[-1] if others else None
