"""SIGTERM (SLURM preemption, docker stop): exit 143, last.ckpt, metrics.json "interrupted"."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli, tiny_overrides
from processes import child_env, python, run, started, wait_for

from vpt_dml.checkpoints import load_checkpoint
from vpt_dml.serving.exported import export_run


@pytest.mark.slow
def test_sigterm_mid_run_exits_143_with_checkpoint_and_interrupted_metrics(tmp_path: Path):
    run_dir = tmp_path / "run"
    args = [
        *tiny_overrides("trainer.max_epochs=1000", "eval_before_training=false"),
        f"hydra.run.dir={run_dir}",
        f"paths.data_dir={tmp_path / 'data'}",
    ]
    with started(python("-m", "vpt_dml.run", *args)) as proc:
        wait_for(run_dir / "checkpoints" / "last.ckpt", proc)
        # a second run into the folder of a live one stops before touching it
        second = run_cli(args, cwd=REPO)
        assert second.returncode == 2 and "is in use by another run" in second.stderr
        assert "Traceback" not in second.stderr
        assert proc.poll() is None, "the first run must still be running"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    assert any(line.startswith("interrupted: SIGTERM") for line in stderr.splitlines()), stderr

    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["status"] == "interrupted"
    info = result["interrupted"]
    assert info["checkpoint"] == str(run_dir / "checkpoints" / "last.ckpt")
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert info["completed_epochs"] >= 1 and "val/recall@1" in result["metrics"]
    if not info["mid_epoch"]:  # the epoch-end checkpoint was kept
        assert ckpt["epoch"] + 1 == info["completed_epochs"]
    assert not (run_dir / "run.lock").exists()

    # a killed run exports from its last.ckpt (config_resolved.yaml was written at start)
    report = export_run(run_dir, tmp_path / "model.safetensors")
    assert report["tuned_tensors"] > 0 and (tmp_path / "model.safetensors").is_file()


# -- process-group kills (issue 19, finding 6) ---------------------------------------------
def ddp_ready(overrides: list[str]) -> list[str]:
    """The tiny settings pin trainer.devices=1 and strategy=auto: left out for trainer=ddp_cpu."""
    return [o for o in overrides if not o.startswith(("trainer.devices=", "trainer.strategy="))]


GROUP_KILL_TIMEOUT_S = 20  # the watchdog's bound in these runs (env VPT_DML_SIGTERM_TIMEOUT_S)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arrangement", "delay_s"),
    [
        pytest.param(  # 2 ranks, 2 workers each
            ["trainer=ddp_cpu", "data.num_workers=2"], 0.0, marks=pytest.mark.both_cores
        ),
        (["trainer.devices=1", "data.num_workers=2"], 1.5),  # one rank, 2 workers
    ],
)
def test_sigterm_to_the_process_group_ends_in_143_interrupted(tmp_path, arrangement, delay_s):
    """docker stop / SLURM / systemd signal every process of the group: ranks and
    DataLoader workers at once. Lightning's handler ran a collective inside the signal
    handler (hung 2 in 10 under DDP); a worker dying of the signal ended the run in exit 1
    and a traceback (3 in 8). Now: exit 143, metrics.json "interrupted", last.ckpt loads."""
    run_dir = tmp_path / "run"
    args = [
        *ddp_ready(
            tiny_overrides(
                "trainer.max_epochs=1000",
                "eval_before_training=false",
                "data.synthetic.num_classes=16",
                "data.batch_size=4",
                "data.eval_batch_size=8",
            )
        ),
        *arrangement,
        f"hydra.run.dir={run_dir}",
        f"paths.data_dir={tmp_path / 'data'}",
    ]
    env = child_env({"VPT_DML_SIGTERM_TIMEOUT_S": str(GROUP_KILL_TIMEOUT_S)}, ddp=True)
    # its own process group, as a container's; nothing of the group outlives the block
    with started(python("-m", "vpt_dml.run", *args), env=env) as proc:
        wait_for(run_dir / "checkpoints" / "last.ckpt", proc)
        time.sleep(delay_s)
        os.killpg(proc.pid, signal.SIGTERM)
        sent = time.monotonic()
        # bounded: the watchdog ends a rank that has not stopped; slack for a loaded machine
        _, stderr = proc.communicate(timeout=GROUP_KILL_TIMEOUT_S + 60)
        took = time.monotonic() - sent
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "exited unexpectedly" not in stderr, stderr[-3000:]
    assert took < GROUP_KILL_TIMEOUT_S + 60
    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["status"] == "interrupted"
    if "watchdog" not in result["interrupted"]:  # the run's own record (the watchdog's is short)
        world = 2 if "trainer=ddp_cpu" in arrangement else 1
        assert result["provenance"]["world_size"] == world
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["epoch"] >= 0 and ckpt["state_dict"]
    # the error and interrupt lines come from rank 0 (rank 1 adds only its own one-liner)
    assert sum(line.startswith("interrupted: SIGTERM") for line in stderr.splitlines()) == 1


WATCHDOG_CHILD = """
import os, sys, time
from vpt_dml.runs.sigterm import SigtermGuard
SigtermGuard(sys.argv[1], sys.argv[2], timeout_s=2, watchdog=True)
r, w = os.pipe()
print("ready", flush=True)
os.read(r, 1)  # a collective whose peer is gone: never returns
"""


def test_watchdog_ends_a_process_stuck_after_sigterm(tmp_path):
    """A rank blocked for good (its peer is gone) still ends: exit 143 after the watchdog's
    timeout, with metrics.json "interrupted" written by rank 0 and last.ckpt named."""
    metrics, ckpt = tmp_path / "metrics.json", tmp_path / "last.ckpt"
    ckpt.write_bytes(b"x")
    script = tmp_path / "watchdog_child.py"  # a script: forked from the fork server
    script.write_text(WATCHDOG_CHILD)
    argv = python(str(script), str(metrics), str(ckpt))
    with started(argv, stdout=subprocess.PIPE) as proc:  # child_env: no RANK, LOCAL_RANK
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "ended by the watchdog" in stderr and f"ckpt_path={ckpt}" in stderr
    result = json.loads(metrics.read_text())
    assert result["status"] == "interrupted"
    assert result["interrupted"]["checkpoint"] == str(ckpt)


@pytest.mark.both_cores
@pytest.mark.slow
def test_ddp_error_is_printed_once(tmp_path):
    """A config error every rank hits (here in on_fit_start) is one line, from rank 0."""
    args = [
        *ddp_ready(
            tiny_overrides(
                "eval_before_training=false",
                "data.synthetic.num_classes=16",
                "data.batch_size=4",
                "model.proxy.class_prompt_store=host",
                "trainer.gradient_clip_val=1.0",
            )
        ),
        "trainer=ddp_cpu",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"paths.data_dir={tmp_path / 'data'}",
    ]
    # a file, not a pipe: rank 1 writes to it after rank 0 has exited
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err:
        argv = python("-m", "vpt_dml.run", *args)
        with started(argv, env=child_env(ddp=True), stderr=err) as proc:
            proc.wait(timeout=400)
            gone_within(proc.pid, 30)  # rank 1 (same process group) may be on its way out
    res = subprocess.CompletedProcess(args, proc.returncode, "", err_path.read_text())
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert "GLOBAL_RANK: 1" in res.stderr  # two ranks ran
    assert len(errors) == 1 and "gradient_clip_val" in errors[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr


def gone_within(group: int, seconds: float) -> None:
    """Wait until no process of process group `group` is left (or `seconds` passed)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


EXIT_WITH_A_LIVE_WORKER = """
import sys, torch
from torch.utils.data import DataLoader
from vpt_dml.runs.sigterm import WorkerInit

loader = DataLoader(list(range(64)), batch_size=2, num_workers=1, worker_init_fn=WorkerInit())
it = iter(loader)  # kept alive to the end, as an error's traceback keeps a fit's iterator
next(it)
print("worker started", flush=True)
sys.exit(2)
"""


def test_an_exit_with_a_live_worker_is_not_held_up_by_it(tmp_path):
    """multiprocessing ends the workers left at exit with one SIGTERM; a worker that
    ignored its first SIGTERM made every error exit with data.num_workers>0 hang."""
    script = tmp_path / "exit_with_worker.py"
    script.write_text(EXIT_WITH_A_LIVE_WORKER)
    proc = run(python(str(script)), timeout=60)
    assert proc.returncode == 2 and "worker started" in proc.stdout, proc.stderr[-2000:]


SIGTERM_IN_THE_FINAL_TEST = """
import os, signal
import lightning as L


class SigtermInTest(L.Callback):
    def on_test_batch_end(self, trainer, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
"""


@pytest.mark.slow
def test_sigterm_in_the_final_test_ends_the_sweep_with_the_run_finished(tmp_path):
    """Too late to stop the run (its last evaluation): the run completes, and the process
    still ends with 143 instead of starting the sweep's next job."""
    (tmp_path / "late_sigterm.py").write_text(SIGTERM_IN_THE_FINAL_TEST)
    sweep = tmp_path / "sweep"
    args = tiny_overrides(
        "+callbacks.late_sigterm={_target_: late_sigterm.SigtermInTest}",
        f"hydra.sweep.dir={sweep}",
        f"paths.data_dir={tmp_path / 'data'}",
    )
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    proc = run_cli(["-m", *args, "seed=0,1"], tmp_path, env=env)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "interrupted: SIGTERM came as the run finished" in proc.stderr
    result = json.loads((sweep / "0" / "metrics.json").read_text())
    assert result["status"] == "finished" and "recall@1" in result["metrics"]
    assert not (sweep / "1").exists()  # the next job never started


GROUP_SIGTERM_AS_THE_TEST_ENDS = """
import os, signal, time
import lightning as L


class GroupSigtermAtTestEnd(L.Callback):
    '''Rank 0, as the final test ends: SIGTERM to the whole process group (docker stop),
    then a slow record: rank 1 has nothing left to do, rank 0 has metrics.json to write.'''

    def on_test_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            os.killpg(os.getpgid(0), signal.SIGTERM)
            time.sleep(8)  # longer than Lightning's child-process observer period (5 s)
"""


@pytest.mark.both_cores
@pytest.mark.slow
def test_group_sigterm_as_the_ddp_final_test_ends_lets_rank_0_finish_the_record(tmp_path):
    """trainer=ddp_cpu, SIGTERM to every process as the final test ends: rank 1, done
    first, exited 143 (or died of the signal) and Lightning SIGKILLed rank 0 before it had
    written metrics.json (exit 137, run.lock left; issue 28 item 10). Now every rank waits
    for rank 0's record and the run ends in 143 with its complete metrics.json."""
    (tmp_path / "group_sigterm.py").write_text(GROUP_SIGTERM_AS_THE_TEST_ENDS)
    run_dir = tmp_path / "run"
    args = [
        *ddp_ready(
            tiny_overrides(
                "eval_before_training=false",
                "data.synthetic.num_classes=16",
                "data.batch_size=4",
                "data.eval_batch_size=8",
            )
        ),
        "trainer=ddp_cpu",
        "+callbacks.group_sigterm={_target_: group_sigterm.GroupSigtermAtTestEnd}",
        f"hydra.run.dir={run_dir}",
        f"paths.data_dir={tmp_path / 'data'}",
    ]
    env = child_env(
        {"PYTHONPATH": str(tmp_path), "VPT_DML_SIGTERM_TIMEOUT_S": str(GROUP_KILL_TIMEOUT_S)},
        ddp=True,
    )
    # its own group: killpg in the callback reaches this group only
    with started(python("-m", "vpt_dml.run", *args), env=env) as proc:
        _, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 143, stderr[-3000:]
    interrupted = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    assert interrupted == [
        "interrupted: SIGTERM came as the run finished; its metrics.json is complete "
        "(a sweep rerun skips it)"
    ], stderr[-3000:]
    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["status"] == "finished" and "recall@1" in result["metrics"]
    assert result["provenance"]["world_size"] == 2
    assert not (run_dir / "run.lock").exists()
    # item 16: rank 0 keeps run.log; Lightning's child rank left train_ddp_process_1.log
    # item 15: the line says what the signal does there (not "stopping at the next batch end")
    assert "received SIGTERM: too late to stop the final test" in (run_dir / "run.log").read_text()
    assert sorted(p.name for p in run_dir.glob("*.log")) == ["run.log"]
