"""`python -m vpt_dml.run` as a user runs it: a subprocess, with Hydra's own parsing."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from conftest import REPO, TINY_BACKBONE, cli_in_process, run_cli, tiny_overrides
from processes import free_port

pytestmark = pytest.mark.slow


def test_cli_run_dir_and_metrics(tmp_path: Path):
    """The command's own wiring, in a fresh interpreter (fork=False): every other CLI test
    may fork its child from the suite's fork server."""
    run_dir = tmp_path / "my_run"
    res = run_cli(
        [
            *tiny_overrides("trainer.max_epochs=1"),
            f"hydra.run.dir={run_dir}",
            f"paths.data_dir={tmp_path / 'data'}",
        ],
        cwd=REPO,
        fork=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert set(metrics) >= {"recall@1", "map@r", "recall@1_before"}
    assert "recall@1" in res.stdout  # the summary table


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.batch_size=7", "not a multiple of samples_per_class"),
        ("model.backbone.weights=/nonexistent/vit.safetensors", "model.backbone.weights"),
        ("model.proxy.kind=banana", "model.proxy.kind"),
        ("model.backbone.name=resnet18", "not a timm VisionTransformer"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path: Path, override: str, expected: str):
    res = cli_in_process(
        [
            *tiny_overrides(override),
            f"hydra.run.dir={tmp_path / 'run'}",
            f"paths.data_dir={tmp_path / 'data'}",
        ],
        cwd=REPO,
    )
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def documented_command(config: Path) -> list[str]:
    """The arguments of the `python -m vpt_dml.run ...` line in a config file's header."""
    for line in config.read_text().splitlines():
        text = line.lstrip("# ").strip()
        if text.startswith("python -m vpt_dml.run"):
            return shlex.split(text)[3:]
    raise AssertionError(f"{config} documents no command")


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
