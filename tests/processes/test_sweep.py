"""A two-point sweep on the demo data through the CLI, tabled by vpt_dml.report."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli, tiny_overrides
from tests.processes import LOCAL_JOBS_FORKED, free_port, python, run, started


@pytest.mark.slow
def test_two_point_prompt_length_sweep_is_reported(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    args = [
        "-m",
        "+hparams_search=prompt_length",
        *tiny_overrides("eval_before_training=false"),
        "model.peft.prompts.num=1,4",
        "model.peft.prompts.depth=2",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.parent.name for p in sweep_dir.rglob("metrics.json")) == ["0", "1"]

    report = run(python("-m", "vpt_dml.report", str(sweep_dir)), cwd=REPO)
    assert report.returncode == 0, report.stderr
    rows = list(csv.reader((sweep_dir / "report.csv").open()))
    assert rows[0][:2] == ["run", "model.peft.prompts.num"] and "recall@1" in rows[0]
    assert sorted(r[1] for r in rows[1:]) == ["1", "4"]
    # the runs really differ in their trainable parameter count (prompt tokens)
    assert len({r[-1] for r in rows[1:]}) == 2
    assert (sweep_dir / "report.png").stat().st_size > 0


def sweep_args(tmp_path: Path, sweep_dir: Path, *extra: str) -> list[str]:
    return [
        "-m",
        *tiny_overrides("eval_before_training=false", *extra),
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.sweep.dir={sweep_dir}",
    ]


@pytest.mark.slow
def test_rerun_of_an_interrupted_sweep_skips_resumes_and_runs_the_rest(tmp_path: Path) -> None:
    """The same `-m` command again: job 0 (finished) is skipped, job 1 (SIGTERM after its
    first epoch) continues from its last.ckpt, job 2 (never started) runs."""
    import json
    import signal
    import time

    sweep_dir = tmp_path / "sweep"
    # 5 epochs: the SIGTERM sent after job 1's first epoch lands in its training, not in
    # its last evaluation (that case ends the sweep with job 1 finished: run.main)
    args = sweep_args(tmp_path, sweep_dir, "trainer.max_epochs=5", "seed=0,1,2")
    with started(python("-m", "vpt_dml.run", *args), cwd=tmp_path) as proc:
        last = sweep_dir / "1" / "checkpoints" / "last.ckpt"
        end = time.monotonic() + 300
        while not last.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < end, "job 1 never saved an epoch"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    status = lambda job: json.loads((sweep_dir / job / "metrics.json").read_text())["status"]  # noqa: E731
    assert status("0") == "finished" and status("1") == "interrupted"
    assert not (sweep_dir / "2" / "metrics.json").exists()
    finished_0 = (sweep_dir / "0" / "metrics.json").read_bytes()

    # another config into the same sweep folder is refused, naming the key that differs
    other = run_cli(sweep_args(tmp_path, sweep_dir, "trainer.max_epochs=6", "seed=0,1,2"), tmp_path)
    assert other.returncode == 2
    assert [line for line in other.stderr.splitlines() if line.startswith("error:")] == [
        f"error: job 0 folder {sweep_dir / '0'} holds a run of another config "
        "(trainer.max_epochs differ); give another hydra.sweep.dir, or replace the earlier "
        "runs with overwrite=true"
    ]

    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"skipped: job 0 finished earlier in {sweep_dir / '0'}" in again.stderr
    assert f"resuming: job 1 continues from {last} (sweep rerun)" in again.stderr
    assert (sweep_dir / "0" / "metrics.json").read_bytes() == finished_0  # not recomputed
    assert status("1") == "finished" and status("2") == "finished"


@pytest.mark.both_cores
@pytest.mark.slow
def test_submitit_local_sweep_runs_each_job_in_its_own_process_and_folder(local_sweep) -> None:
    """hydra/launcher=local: submitit starts one process per job; one job finishes in its
    own run folder, the other (a bad override) fails alone and says why in its log. The
    session's sweep (conftest.local_sweep), read by the report's test too."""
    import json

    from omegaconf import OmegaConf

    sweep_dir = local_sweep["dir"]
    # the sweep names its failed job (run folder, error line) once the processes ended
    proc = local_sweep["proc"]
    assert proc.returncode == 1, proc.stderr[-3000:]
    failed = [line for line in proc.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and failed[0].endswith(
        f"(no result) in {sweep_dir / '1'}: error: optim.lr='abc' has the wrong type: expected a number"
    ), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    results = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")}
    assert sorted(results) == ["0"]
    assert results["0"]["status"] == "finished"
    assert OmegaConf.load(sweep_dir / "0" / "config_resolved.yaml").optim.lr == 0.001
    # two jobs, two processes: each has its own submitit folder (its process id) and logs
    job_dirs = sorted(p for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit())
    assert len(job_dirs) == 2
    assert not list(sweep_dir.glob("*/run.lock"))
    failed = [d for d in job_dirs if not list(d.glob("*_result.pkl"))]
    assert len(failed) == 1
    last_line = next(failed[0].glob("*_log.err")).read_text().strip().splitlines()[-1]
    assert last_line.startswith("error: ") and "optim.lr='abc'" in last_line, last_line
    assert not (sweep_dir / "1" / "metrics.json").exists()


@pytest.mark.both_cores
@pytest.mark.slow
def test_ddp_inside_a_local_submitit_job_is_one_two_process_run(tmp_path: Path) -> None:
    """With a launcher, `-m` and DDP go together: submitit starts one task per device and
    the two tasks train as one process group (Lightning must not re-launch the job)."""
    import json

    from tests.conftest import TINY_BACKBONE, TINY_DATA, TINY_TRAINER

    sweep_dir = tmp_path / "sweep"
    trainer = [o for o in TINY_TRAINER if not o.startswith(("trainer.devices", "trainer.strategy"))]
    args = [
        "-m",
        "hydra/launcher=local",
        *TINY_BACKBONE,
        *TINY_DATA,
        *trainer,
        "trainer=ddp_cpu",
        "data.batch_size=4",  # 2 ranks x 2 classes of the 4 training classes
        "eval_before_training=false",
        "seed=0",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    proc = run_cli(args, cwd=tmp_path, env={"MASTER_PORT": str(free_port()), **LOCAL_JOBS_FORKED})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((sweep_dir / "0" / "metrics.json").read_text())
    assert result["status"] == "finished" and result["provenance"]["world_size"] == 2
    assert [p.name for p in sweep_dir.iterdir() if p.name.isdigit()] == ["0"]
    assert not (sweep_dir / "0" / "run.lock").exists()


@pytest.mark.slow
def test_in_process_sweep_records_failed_jobs_and_runs_the_rest(tmp_path: Path) -> None:
    """Hydra's own launcher (every job in this process): a diverged job and a job with bad
    input do not end the sweep; it ends with one `failed:` line per failed job and the
    first failed job's exit code, and its rerun skips the finished job and still goes on."""
    import json

    sweep_dir = tmp_path / "sweep"
    args = sweep_args(tmp_path, sweep_dir, "trainer.max_epochs=2", "optim.lr=1e20,oops,1e-3")

    def failed_lines(stderr: str) -> list[str]:
        return [
            line.split(": ", 2)[:2] for line in stderr.splitlines() if line.startswith("failed:")
        ]

    first = run_cli(args, cwd=tmp_path, timeout=600)
    assert first.returncode == 3, first.stderr[-3000:]  # job 0's: diverged
    assert failed_lines(first.stderr) == [
        ["failed", f"job 0 (optim.lr=1e+20) in {sweep_dir / '0'}"],
        ["failed", f"job 1 (optim.lr=oops) in {sweep_dir / '1'}"],
    ], first.stderr[-3000:]
    assert "Traceback" not in first.stderr
    status = lambda job: json.loads((sweep_dir / job / "metrics.json").read_text())["status"]  # noqa: E731
    assert status("0") == "diverged" and status("2") == "finished"
    assert not (sweep_dir / "1" / "metrics.json").exists()
    assert not list(sweep_dir.glob("*/run.lock"))
    finished_2 = (sweep_dir / "2" / "metrics.json").read_bytes()

    again = run_cli(args, cwd=tmp_path, timeout=600)
    assert again.returncode == 3, again.stderr[-3000:]
    assert f"skipped: job 0 diverged earlier in {sweep_dir / '0'}" in again.stderr
    assert f"skipped: job 2 finished earlier in {sweep_dir / '2'}" in again.stderr
    assert [f[1].split(" ")[1] for f in failed_lines(again.stderr)] == ["0", "1"]
    assert (sweep_dir / "2" / "metrics.json").read_bytes() == finished_2  # not recomputed
