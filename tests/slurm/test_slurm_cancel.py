"""scancel and run-folder locks through real Slurm: a cancelled job ends the sweep's wait
with its state and leaves an interrupted, resumable run; the same command resumes it. A lock
whose job Slurm no longer lists is taken over; one of a running job is not."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm.helpers import error_lines, metrics, run, start, sweep_args

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

DATA = ["data.synthetic.num_classes=16", "data.synthetic.images_per_class=8"]


def sbatch(*args: str) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", "-p", "cpu", "-c", "1", "--mem=10", "-o", "/dev/null", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().split(";")[0]


def queued(job: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    return bool(out.stdout.strip())


@pytest.mark.timeout(600)
def test_scancel_ends_the_wait_and_the_same_command_resumes(tmp_path: Path) -> None:
    args = sweep_args(tmp_path, *DATA, "trainer.max_epochs=6", "seed=0")
    proc = start(args, cwd=tmp_path)
    run_dir = tmp_path / "sweep" / "0"
    last = run_dir / "checkpoints" / "last.ckpt"
    end = time.monotonic() + 400
    while not last.exists():  # the first epoch has ended
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < end, "no last.ckpt"
        time.sleep(0.5)
    job = json.loads((run_dir / "run.lock").read_text())["slurm_job"]
    subprocess.run(["scancel", job], check=True)
    out, _ = proc.communicate(timeout=120)
    # the parent's wait ended with the job's state, one line, exit 1
    assert proc.returncode == 1, out[-3000:]
    failed = [ln for ln in out.splitlines() if ln.startswith("failed: job")]
    assert len(failed) == 1 and "CANCELLED" in failed[0] and str(run_dir) in failed[0], out[-3000:]
    assert "interrupted: SIGTERM" in failed[0]
    assert len(error_lines(out)) == 1 and "Traceback" not in out
    first = metrics(run_dir)
    assert first["status"] == "interrupted"
    assert first["interrupted"]["completed_epochs"] >= 1
    # the same command again: the job continues from its last.ckpt and finishes
    again = run(args, cwd=tmp_path, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    logs = "\n".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").rglob("*.err"))
    assert f"resuming: job 0 continues from {last}" in logs
    assert metrics(run_dir)["status"] == "finished"


@pytest.mark.timeout(600)
def test_a_lock_of_a_job_slurm_no_longer_lists_is_taken_over_a_running_ones_is_not(
    tmp_path: Path,
) -> None:
    ended = sbatch("--wrap", "true")
    running = sbatch("--wrap", "sleep 600")
    try:
        end = time.monotonic() + 60
        while queued(ended):
            assert time.monotonic() < end
            time.sleep(1)
        for num, job in (("0", ended), ("1", running)):
            folder = tmp_path / "sweep" / num
            folder.mkdir(parents=True)
            # left by a job on another node: only Slurm can say whether it still runs
            lock = {"pid": 4242, "host": "node-17", "slurm_job": job, "slurm_restart": "0"}
            (folder / "run.lock").write_text(json.dumps(lock))
        proc = run(sweep_args(tmp_path, "seed=0,1"), cwd=tmp_path, timeout=500)
    finally:
        subprocess.run(["scancel", running])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert metrics(tmp_path / "sweep" / "0")["status"] == "finished"  # taken over
    failed = [ln for ln in proc.stderr.splitlines() if ln.startswith("failed: job")]
    assert len(failed) == 1 and str(tmp_path / "sweep" / "1") in failed[0], proc.stderr[-3000:]
    assert "in use by another run" in failed[0]
    assert not (tmp_path / "sweep" / "1" / "metrics.json").exists()
