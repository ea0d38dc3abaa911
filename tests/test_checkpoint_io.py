"""Issue 19 finding 9: a full disk leaves every checkpoint whole, says so in one line, and
is announced at start-up; checkpoints are written to a temporary name and renamed."""

from __future__ import annotations

import contextlib
import logging
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_config, run_cli, tiny_overrides
from vpt_dml.checkpoints import load_checkpoint
from vpt_dml.errors import Diverged
from vpt_dml.run import train
from vpt_dml.runs.checkpoint_io import AtomicCheckpointIO, DiskFull


@contextlib.contextmanager
def tmpfs(mount: Path, size: str):
    """A real file system of `size` (tmpfs) at `mount`; the test is skipped without root."""
    mount.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {res.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)


@pytest.fixture
def small_disk(tmp_path):
    """A real 400 KiB file system (tmpfs): room for one tiny checkpoint (~240 KiB), not two."""
    with tmpfs(tmp_path / "disk", "400k") as mount:
        yield mount


def test_disk_full_during_training_is_one_line_and_leaves_whole_checkpoints(
    small_disk, tmp_path, caplog
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


def test_a_failed_write_keeps_the_previous_file(small_disk):
    io = AtomicCheckpointIO()
    target = small_disk / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(10)}}, target)
    before = target.read_bytes()
    with pytest.raises(DiskFull, match="needs about 3.8 MiB"):
        io.save_checkpoint({"state_dict": {"w": torch.ones(1_000_000)}}, target)
    assert target.read_bytes() == before and sorted(small_disk.iterdir()) == [target]


def test_a_non_finite_state_is_never_written(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    before = target.read_bytes()
    with pytest.raises(Diverged, match=r"state_dict\.w"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, target)
    assert target.read_bytes() == before and sorted(tmp_path.iterdir()) == [target]


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
