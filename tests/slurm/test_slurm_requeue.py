"""The time limit through real Slurm: `sbatch --time` + `--signal=USR2@delay` (the launcher's
timeout_min / signal_delay_s), the run saves and requeues itself, Slurm starts it again, it
resumes from last.ckpt in the same folder; its final metrics equal an uninterrupted run's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import open_dict

from tests.conftest import compose_config, tiny_overrides
from tests.slurm.helpers import metrics, start, sweep_args
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
    # about 2 minutes of training (60 epochs took ~45 s here): longer than one allocation
    # lets it train before the signal, so it is signalled and requeued at least once
    settings = [*DATA, "trainer.max_epochs=150"]
    job = tmp_path / "job"
    job.mkdir()
    proc = start(sweep_args(job, *settings, *LIMIT, "seed=0"), cwd=job)
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
