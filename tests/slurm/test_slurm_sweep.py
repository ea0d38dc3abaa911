"""The README's sweep through real sbatch on a CPU partition, and what is refused before
anything is submitted (the request the partition cannot meet, a bad job config, sbatch's own
refusal): one `error:` line each, exit 2, nothing queued."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.slurm.helpers import error_lines, metrics, run, squeue_ids, sweep_args

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.mark.timeout(300)
def test_readme_sweep_with_accelerator_auto_runs_on_a_cpu_partition(tmp_path: Path) -> None:
    """`trainer.accelerator=auto` (the demo's) on a partition without GPUs: no GPU is asked
    for, both jobs finish in their folders, and vpt_dml.report reads the sweep."""
    proc = run(sweep_args(tmp_path, "trainer.accelerator=auto", "seed=0,1"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "sweep"
    assert [metrics(sweep / n)["status"] for n in ("0", "1")] == ["finished", "finished"]
    sbatch = next((sweep / ".submitit").rglob("*_submission.sh")).read_text()
    assert "--gpus-per-node" not in sbatch and "--gres" not in sbatch
    # quiet waiting without accounting: no sacct warning per poll
    assert "sacct" not in proc.stderr, proc.stderr[-2000:]
    report = run([str(sweep)], cwd=tmp_path, module="vpt_dml.report", timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "recall@1" in report.stdout.lower() or any(sweep.glob("report*"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("extra", "knob"),
    [
        # the launcher's request against the node (2 CPUs, ~23 GB)
        (["hydra.launcher.mem_gb=4096"], "hydra.launcher.mem_gb"),
        (["hydra.launcher.cpus_per_task=64"], "hydra.launcher.cpus_per_task"),
        # a GPU asked for on a partition that has none
        (["trainer.accelerator=gpu"], "trainer.accelerator"),
        # a job's config, checked before it is queued
        (["optim.lr=-1"], "optim.lr"),
    ],
)
def test_a_request_that_cannot_run_is_refused_before_sbatch(
    tmp_path: Path, extra: list[str], knob: str
) -> None:
    before = squeue_ids()
    proc = run(sweep_args(tmp_path, *extra, "seed=0,1"), cwd=tmp_path, timeout=100)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and knob in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert squeue_ids() <= before  # nothing was queued
    assert not list((tmp_path / "sweep").rglob("*_submission.sh"))


@pytest.mark.timeout(120)
def test_sbatch_refusal_is_one_error_line(tmp_path: Path) -> None:
    """What only sbatch knows (a feature no node has): its message, one line, exit 2."""
    proc = run(
        sweep_args(tmp_path, "hydra.launcher.constraint=no_such_feature", "seed=0"),
        cwd=tmp_path,
        timeout=100,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "sbatch" in lines[0] and "feature" in lines[0].lower(), lines
    assert "Traceback" not in proc.stderr
