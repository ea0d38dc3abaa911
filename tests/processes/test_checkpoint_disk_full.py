"""Issue 19 finding 9, through the command line: a full disk leaves every checkpoint whole,
says so in one line, and is announced at start-up (the writes themselves:
tests/runs/test_checkpoint_io.py)."""

from __future__ import annotations

import logging

import pytest

from tests.conftest import compose_config, run_cli, tiny_overrides
from tests.runs.test_checkpoint_io import small_disk, tmpfs  # noqa: F401 - small_disk: a fixture
from vpt_dml.checkpoints import load_checkpoint
from vpt_dml.run import train
from vpt_dml.runs.checkpoint_io import DiskFull


def test_disk_full_during_training_is_one_line_and_leaves_whole_checkpoints(
    small_disk,  # noqa: F811
    tmp_path,
    caplog,
):
    cfg = compose_config(tiny_overrides("trainer.max_epochs=4"), tmp_path)
    cfg.paths.output_dir = str(small_disk / "run")
    caplog.set_level(logging.WARNING, logger="vpt_dml")
    with pytest.raises(DiskFull) as caught:
        train(cfg)
    folder = small_disk / "run" / "checkpoints"
    line = str(caught.value)
    assert "\n" not in line and f"no space left in {folder}" in line
    assert "needs about" in line and "MiB free" in line
    # the start-up check saw it coming
    assert any(
        "free in" in r.getMessage() and str(folder) in r.getMessage() for r in caplog.records
    )
    left = sorted(folder.iterdir())
    assert left and all(p.suffix == ".ckpt" for p in left), left  # no temporary file left
    for path in left:  # each one whole: loads and holds its epoch's weights
        assert "state_dict" in load_checkpoint(path)


def test_disk_full_before_the_first_checkpoint_advises_no_missing_last_ckpt(tmp_path):
    """Issue 28 item 14: the first checkpoint does not fit (no epoch saved yet): the line
    must not advise resuming from a last.ckpt that does not exist."""
    wider = "++model.backbone.kwargs={img_size: 32, patch_size: 8, embed_dim: 96, depth: 2, num_heads: 2}"
    with tmpfs(tmp_path / "disk", "300k") as disk:
        cfg = compose_config(tiny_overrides(wider, "eval_before_training=false"), tmp_path)
        cfg.paths.output_dir = str(disk / "run")
        with pytest.raises(DiskFull) as caught:
            train(cfg)
        folder = disk / "run" / "checkpoints"
        assert not (folder / "last.ckpt").exists()
    line = str(caught.value)
    assert "\n" not in line and f"no space left in {folder}" in line
    assert "ckpt_path=" not in line and "start the run again" in line


@pytest.mark.slow
def test_a_disk_too_full_to_start_is_one_line(tmp_path):
    """Issue 28 item 14: ~8 kB free when the run starts ended in Hydra's traceback (its
    .hydra/ files); now one error line before anything is written, exit 2."""
    with tmpfs(tmp_path / "disk", "8k") as disk:
        res = run_cli(
            [*tiny_overrides(), f"hydra.run.dir={disk / 'run'}", f"paths.data_dir={tmp_path}/d"],
            cwd=tmp_path,
            timeout=300,
        )
        left = sorted(p.name for p in (disk / "run").iterdir())
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "KiB free" in errors[0] and "hydra.run.dir" in errors[0], errors
    assert left == []  # no lock, no .hydra/ left behind
