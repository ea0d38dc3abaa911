"""hydra/launcher=slurm composes with every preset and asks SLURM for what the trainer says;
the run folder name every process of a torchrun / SLURM job agrees on (no subprocesses)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import submitit
from conftest import CONF, compose_config
from hydra.utils import instantiate
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

from vpt_dml.errors import UserError
from vpt_dml.runs import cluster

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def sbatch_text(cfg, tmp_path: Path, monkeypatch) -> str:
    """The sbatch file submitit writes for this config, built the way the launcher builds
    its executor (hydra_submitit_launcher.submitit_launcher.BaseSubmititLauncher.launch)."""
    # submitit's SlurmExecutor only checks that `srun` is on PATH; nothing runs it here
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    launcher = instantiate(cfg.hydra.launcher)  # the launcher resolves its params here
    params = dict(launcher.params)
    executor = submitit.AutoExecutor(
        cluster="slurm",
        folder=str(tmp_path / ".submitit" / "%j"),
        slurm_max_num_timeout=params.pop("max_num_timeout"),
    )
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python -m vpt_dml.run", "uid")


def sbatch_options(text: str) -> dict[str, str]:
    lines = [
        line[len("#SBATCH --") :] for line in text.splitlines() if line.startswith("#SBATCH --")
    ]
    return dict(line.split("=", 1) if "=" in line else (line, "") for line in lines)


@pytest.mark.parametrize("preset", PRESETS)
def test_slurm_launcher_composes_with_every_preset(preset: str, tmp_path: Path) -> None:
    cfg = compose_config(["hydra/launcher=slurm"], tmp_path, experiment=preset)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    # one task per device; the preset's own devices / nodes decide the allocation
    assert launcher["tasks_per_node"] == cfg.trainer.devices
    assert launcher["nodes"] == cfg.trainer.num_nodes
    assert launcher["submitit_folder"].endswith("/.submitit/%j")


@pytest.mark.parametrize(
    ("overrides", "gpus", "tasks", "nodes"),
    [
        (["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"], "4", "4", "2"),
        (["trainer.accelerator=gpu", "trainer.devices=1"], "1", "1", "1"),
        # CPU processes: tasks, and no GPU request at all
        (["trainer=ddp_cpu"], None, "2", "1"),
    ],
)
def test_sbatch_file_asks_for_the_trainers_devices_tasks_and_nodes(
    overrides, gpus, tasks, nodes, tmp_path: Path, monkeypatch
) -> None:
    cfg = compose_config(
        ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", *overrides],
        tmp_path,
        experiment="cub_deep",
    )
    opts = sbatch_options(sbatch_text(cfg, tmp_path, monkeypatch))
    assert opts.get("gpus-per-node") == gpus
    assert opts["ntasks-per-node"] == tasks
    assert opts["nodes"] == nodes
    assert opts["partition"] == "gpu"
    # the warning signal the run turns into last.ckpt + requeue, signal_delay_s early
    assert opts["signal"] == f"USR2@{cfg.hydra.launcher.signal_delay_s}"
    assert opts["time"] == str(cfg.hydra.launcher.timeout_min)
    assert opts["output"].startswith(str(tmp_path / ".submitit"))


def test_slurm_sweep_refuses_a_device_count_it_cannot_ask_for(tmp_path: Path) -> None:
    cfg = compose_config(["hydra/launcher=slurm", "trainer=ddp"], tmp_path)  # devices: -1
    with pytest.raises(UserError, match=r"trainer.devices=-1 is not a count"):
        cluster.check_launcher_resources(cfg)
    ok = compose_config(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=2"], tmp_path)
    cluster.check_launcher_resources(ok)
    with pytest.raises(UserError, match=r"hydra/launcher=local starts one task per device"):
        cluster.check_launcher_resources(
            compose_config(["hydra/launcher=local", "trainer=ddp"], tmp_path)
        )
    # Hydra's own launcher: one process, nothing to derive
    cluster.check_launcher_resources(compose_config(["trainer=ddp"], tmp_path))


def test_run_dir_reads_the_pinned_stamp(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(cluster.STAMP_ENV, "slurm-77")
    cfg = compose_config([], tmp_path)
    assert str(cfg.hydra.run.dir).endswith("/runs/slurm-77")
    monkeypatch.delenv(cluster.STAMP_ENV)
    cfg = compose_config([], tmp_path)
    assert "slurm" not in str(cfg.hydra.run.dir) and str(cfg.hydra.run.dir).count("-") >= 4


@pytest.mark.parametrize(("squeue_says", "taken_over"), [("", True), ("RUNNING", False)])
def test_a_lock_of_a_job_on_another_node_is_stale_once_squeue_no_longer_lists_it(
    squeue_says: str, taken_over: bool, tmp_path: Path, monkeypatch
) -> None:
    import json

    from vpt_dml.runs import folder as run_folder

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / run_folder.LOCK).write_text(
        json.dumps({"pid": 12345, "host": "node-17", "slurm_job": "111", "slurm_restart": "0"})
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(
        f'#!/bin/sh\n[ -n "{squeue_says}" ] && echo {squeue_says}\nexit 0\n'
    )
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "222")  # the sweep's rerun, a new job on another node
    if taken_over:
        run_folder.claim(folder)
        assert json.loads((folder / run_folder.LOCK).read_text())["slurm_job"] == "222"
        run_folder.release(folder)
    else:
        with pytest.raises(UserError, match="in use by another run"):
            run_folder.claim(folder)


@pytest.mark.parametrize(
    ("launcher", "refused"), [("basic", True), ("local", False), ("slurm", False)]
)
def test_ddp_sweep_is_refused_only_when_jobs_share_one_process(
    launcher: str, refused: bool, tmp_path: Path
) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from vpt_dml.runs.lifecycle import refuse_ddp_sweep

    cfg = compose_config(
        [f"hydra/launcher={launcher}", "trainer=ddp", "trainer.devices=2"], tmp_path
    )
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    try:
        if refused:
            with pytest.raises(UserError, match="a sweep .-m. cannot run"):
                refuse_ddp_sweep(cfg)
        else:
            refuse_ddp_sweep(cfg)  # submitit: every job is its own process group
    finally:
        HydraConfig.instance().cfg = None


def test_every_process_of_a_job_names_the_same_run_folder() -> None:
    # SLURM: the job id, kept by a requeued job; an array task has its own folder
    assert cluster.run_stamp({"SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "x"}) == "slurm-77"
    array = {"SLURM_JOB_ID": "80", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"}
    assert cluster.run_stamp({**array, "SLURM_JOB_NAME": "x"}) == "slurm-77_3"
    # an interactive allocation is not a batch job: the time of day as usual
    assert cluster.run_stamp({"SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "bash"}) is None
    # torchrun: the rendezvous id when there is one, else torchrun's own start time
    elastic = {"TORCHELASTIC_RUN_ID": "none", "LOCAL_RANK": "1"}
    assert cluster.run_stamp({**elastic, "TORCHELASTIC_RUN_ID": "exp7"}) == "torchrun-exp7"
    start = 1_700_000_000.0
    from datetime import datetime

    assert cluster.run_stamp(elastic, parent_start=start) == datetime.fromtimestamp(start).strftime(
        "%Y-%m-%d_%H-%M-%S"
    )
    assert cluster.run_stamp({}) is None
