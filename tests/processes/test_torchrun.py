"""DDP started by torchrun (as srun starts it: the processes exist before Python runs) trains
as Lightning's own `trainer=ddp_cpu` launch does: same metrics, one run folder, one
metrics.json, no lock left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_BACKBONE, TINY_DATA, TINY_TRAINER, run_cli
from processes import child_env, free_port, python, run

SETTINGS = [
    *TINY_BACKBONE,
    *TINY_DATA,
    *(o for o in TINY_TRAINER if not o.startswith(("trainer.devices", "trainer.strategy"))),
    "trainer=ddp_cpu",
    "data.batch_size=4",  # per process: 2 ranks x 2 classes of the 4 training classes
    "trainer.max_epochs=2",
    "eval_before_training=false",
    "seed=3",
]


@pytest.mark.both_cores
@pytest.mark.slow
def test_torchrun_two_processes_equal_lightnings_ddp_cpu_launch(tmp_path: Path) -> None:
    data = f"paths.data_dir={tmp_path / 'data'}"
    spawn_dir = tmp_path / "spawn"
    spawned = run_cli(
        [*SETTINGS, data, f"hydra.run.dir={spawn_dir}"],
        cwd=tmp_path,
        env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())},
    )
    assert spawned.returncode == 0, spawned.stderr[-3000:]

    # torchrun with no hydra.run.dir: both workers must agree on the default folder
    cwd = tmp_path / "elastic"
    cwd.mkdir()
    env = child_env()
    env.pop("VPT_RUN_STAMP", None)
    launched = run(
        python(
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=2",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
            "-m",
            "vpt_dml.run",
            *SETTINGS,
            data,
        ),
        cwd=cwd,
        env=env,
        timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    folders = list((cwd / "outputs" / "demo" / "runs").iterdir())
    assert len(folders) == 1, folders  # one run folder for both processes
    run_dir = folders[0]
    assert [p.relative_to(cwd) for p in cwd.rglob("metrics.json")] == [
        run_dir.relative_to(cwd) / "metrics.json"
    ]
    assert not (run_dir / "run.lock").exists()

    a = json.loads((spawn_dir / "metrics.json").read_text())
    b = json.loads((run_dir / "metrics.json").read_text())
    assert a["provenance"]["world_size"] == b["provenance"]["world_size"] == 2
    assert b["status"] == "finished"
    assert a["metrics"].keys() == b["metrics"].keys()
    for key, value in a["metrics"].items():
        assert b["metrics"][key] == pytest.approx(value, abs=1e-6), key
