"""conf/trainer/ddp_cpu.yaml's documented command, run on the demo's classes (2 gloo
processes re-launching the CLI)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from conftest import REPO, TINY_BACKBONE, run_cli
from processes import free_port

pytestmark = pytest.mark.slow


def documented_command(config: Path) -> list[str]:
    """The arguments of the `python -m vpt_dml.run ...` line in a config file's header."""
    for line in config.read_text().splitlines():
        text = line.lstrip("# ").strip()
        if text.startswith("python -m vpt_dml.run"):
            return shlex.split(text)[3:]
    raise AssertionError(f"{config} documents no command")


@pytest.mark.both_cores
def test_ddp_cpu_command_runs_on_the_demo_data(tmp_path: Path):
    """conf/trainer/ddp_cpu.yaml's command, as written, on the demo's classes (48, of which
    24 train) and batch settings; only the backbone, image count and epochs are tiny."""
    args = documented_command(REPO / "conf" / "trainer" / "ddp_cpu.yaml")
    run_dir = tmp_path / "run"
    res = run_cli(
        [
            *args,
            *TINY_BACKBONE,
            "data.synthetic.images_per_class=4",
            "data.synthetic.image_size=32",
            "data.num_workers=0",
            "data.eval_batch_size=64",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            "eval_before_training=false",
            f"hydra.run.dir={run_dir}",
            f"paths.data_dir={tmp_path / 'data'}",
        ],
        cwd=REPO,
        env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())},
        timeout=400,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["provenance"]["world_size"] == 2
    assert result["provenance"]["dataset"]["counts"]["train_classes"] == 24
    assert "recall@1" in result["metrics"]
