"""SLURM requeue: the warning signal before the time limit -> last.ckpt -> `scontrol requeue`
-> the requeued job (SLURM_RESTART_COUNT=1) resumes in the same folder and ends as a run
that was never stopped. Only `scontrol` is a stand-in (it records its arguments)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import compose_config, run_cli, tiny_overrides
from processes import python, started

from vpt_dml.run import train

JOB = "4242"


def slurm_env(tmp_path: Path, restart: int) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        # what a one-task sbatch job sees (Lightning's SLURMEnvironment reads these)
        "SLURM_JOB_ID": JOB,
        "SLURM_JOB_NAME": "vpt",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "SLURM_RESTART_COUNT": str(restart),
    }


@pytest.mark.slow
def test_sigusr1_requeues_and_the_requeued_job_resumes_exactly(tmp_path: Path) -> None:
    settings = tiny_overrides("trainer.max_epochs=3", "eval_before_training=false")
    args = [*settings, f"paths.data_dir={tmp_path / 'data'}"]
    # no hydra.run.dir: under SLURM the default folder is named after the job
    run_dir = tmp_path / "outputs" / "demo" / "runs" / f"slurm-{JOB}"
    last = run_dir / "checkpoints" / "last.ckpt"

    with started(
        python("-m", "vpt_dml.run", *args), cwd=tmp_path, env=slurm_env(tmp_path, 0)
    ) as proc:
        end = time.monotonic() + 300
        while not last.exists():  # the first epoch has ended
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < end, "no last.ckpt"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)  # what `sbatch --signal=USR1@T` sends T s before the limit
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", JOB]
    assert f"requeued SLURM job {JOB}" in err
    first = json.loads((run_dir / "metrics.json").read_text())
    assert first["status"] == "interrupted"
    assert first["interrupted"]["completed_epochs"] < 3  # really stopped mid-run
    # one resume path: no Lightning hpc checkpoint beside last.ckpt
    assert not list(run_dir.rglob("hpc_ckpt_*.ckpt"))

    # the requeued job: same command, same job id, SLURM_RESTART_COUNT=1, no ckpt_path
    again = run_cli(args, cwd=tmp_path, env=slurm_env(tmp_path, 1))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming: continues from {last}" in again.stderr
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert resumed["status"] == "finished"
    assert not (run_dir / "run.lock").exists()

    # the same settings never stopped (in this process: no SLURM variables at all)
    straight = train(compose_config(settings, tmp_path / "straight"))
    assert straight["recall@1"] == resumed["metrics"]["recall@1"]
    for key, value in straight.items():
        assert resumed["metrics"][key] == pytest.approx(value, abs=1e-6), key
