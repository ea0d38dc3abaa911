"""The time limit through real Slurm: `sbatch --time` + `--signal=USR2@delay` (the launcher's
timeout_min / signal_delay_s), the run saves and requeues itself, Slurm starts it again, it
resumes from last.ckpt in the same folder; its final metrics equal an uninterrupted run's."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from omegaconf import open_dict

from tests.conftest import compose_config, tiny_overrides
from tests.slurm.helpers import env, metrics, start, sweep_args
from vpt_dml.run import train

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# 16 classes x 8 images (half for training), batches of 8: 8 steps per epoch
DATA = ["data.synthetic.num_classes=16", "data.synthetic.images_per_class=8"]
# a 2-minute limit, the signal 40 s before it (Slurm sends it up to ~30 s earlier)
LIMIT = ["hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=40"]


def straight_run(tmp_path: Path, *extra: str) -> dict:
    """The same settings never stopped, in this process (while the job runs)."""
    cfg = compose_config(tiny_overrides("eval_before_training=false", *extra), tmp_path)
    with open_dict(cfg):
        cfg.paths.data_dir = str(tmp_path / "data")  # its own copy: no race on generation
    return train(cfg)


def job_logs(sweep: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in (sweep / ".submitit").rglob("*.err"))


@pytest.mark.timeout(600)
def test_time_limit_signal_requeues_and_the_resumed_run_equals_a_straight_one(tmp_path):
    # 150 epochs x 8 steps, each followed by 0.08 s of sleep in the job's first start only:
    # at least 96 s of training however fast the machine (the signal comes 50-80 s after
    # the start), so it is signalled and requeued at least once; sleeping changes no number
    settings = [*DATA, "trainer.max_epochs=150"]
    slow = [
        "+callbacks.slow_steps._target_=tests.slurm.slow_steps.SleepAfterEachStep",
        "+callbacks.slow_steps.seconds=0.08",
    ]
    job = tmp_path / "job"
    job.mkdir()
    proc = start(sweep_args(job, *settings, *slow, *LIMIT, "seed=0"), cwd=job)
    straight = straight_run(tmp_path / "straight", *settings, "seed=0")
    out, _ = proc.communicate(timeout=540)
    assert proc.returncode == 0, out[-4000:]
    logs = job_logs(job / "sweep")
    # Slurm signalled the job at its time limit, the run requeued itself and resumed
    assert re.search(r"SIGUSR2: the time limit is near", logs), logs[-3000:]
    assert "requeued SLURM job" in logs and "resuming: job 0 continues from" in logs, logs[-3000:]
    result = metrics(job / "sweep" / "0")
    assert result["status"] == "finished"
    assert result["metrics"] == straight  # bit for bit


def csv_steps(run_dir: Path) -> int:
    """The last training step the run's CSV history holds (flushed every step here)."""
    path = run_dir / "csv" / "metrics.csv"
    try:
        rows = list(csv.DictReader(path.read_text().splitlines()))
    except (OSError, csv.Error):
        return -1
    return max((int(r["step"]) for r in rows if (r.get("step") or "").isdigit()), default=-1)


def restarts(job: str) -> int:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    found = re.search(r"Restarts=(\d+)", out)
    return int(found.group(1)) if found else -1


@pytest.mark.timeout(600)
def test_requeued_twice_inside_the_first_epoch_resumes_exactly(tmp_path):
    """Slurm's warning signal (sent with `scancel --signal=USR2`, at chosen steps: the time
    limit's own timing is a minute off) twice inside the first epoch: each allocation saves
    its newer mid-epoch state, the next one continues from it, and the run equals one that
    was never stopped."""
    # 16 classes x 100 images: 100 steps per epoch; the CSV written at every step
    settings = [
        "data.synthetic.num_classes=16",
        "data.synthetic.images_per_class=100",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        "+logger.csv.flush_logs_every_n_steps=1",
    ]
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    proc = start(sweep_args(job_dir, *settings, "hydra.launcher.timeout_min=10", "seed=0"), job_dir)
    run_dir = job_dir / "sweep" / "0"
    stops = []
    for allocation in range(2):
        end = time.monotonic() + 300
        while csv_steps(run_dir) < (stops[-1] if stops else 0) + 5:  # 5 steps into it
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < end, f"allocation {allocation} did not train"
            time.sleep(0.2)
        job = json.loads((run_dir / "run.lock").read_text())["slurm_job"]
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        while restarts(job) < allocation + 1:  # the run requeued its job
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < end, f"allocation {allocation} was not requeued"
            time.sleep(0.5)
        info = metrics(run_dir)["interrupted"]
        assert info["mid_epoch"] and info["completed_epochs"] == 0, info  # inside epoch 0
        assert info["global_step"] > (stops[-1] if stops else 0)  # the newer state was saved
        stops.append(info["global_step"])
    straight = straight_run(tmp_path / "straight", *settings, "seed=0")
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-4000:]
    result = metrics(run_dir)
    assert result["status"] == "finished"
    assert result["metrics"] == straight  # bit for bit


@pytest.mark.timeout(180)
def test_a_time_limit_shorter_than_start_up_plus_an_epoch_is_warned_about(tmp_path):
    """Where the interrupted epoch is redone (DataLoader workers), a job whose time limit
    cannot hold start-up plus one epoch would never advance: the run says so. The limit is
    read from Slurm inside a real job (`--time=1`: 60 s)."""
    import sys

    code = (
        "from vpt_dml.runs.requeue_budget import warn_if_too_short as w;"
        "assert w(30.0, 10.0) is None;"  # 40 s fit in 60 s
        "print('LINE', w(55.0, 10.0))"
    )
    out = tmp_path / "out.txt"
    subprocess.run(
        ["sbatch", "--wait", "-p", "cpu", "-c", "1", "--mem=100", "--time=1", "-o", str(out),
         "--wrap", f"{sys.executable} -c \"{code}\""],
        check=True, capture_output=True, timeout=170, env=env(),
    )  # fmt: skip
    text = out.read_text()
    assert (
        "LINE warning: start-up (10 s) plus one epoch (55 s) exceed this job's time limit (60 s)"
        in text
    ), text
    assert "hydra.launcher.timeout_min" in text and "data.num_workers=0" in text
