"""Issue 19 finding 9: a full disk leaves every checkpoint whole, says so in one line, and
is announced at start-up; checkpoints are written to a temporary name and renamed."""

from __future__ import annotations

import logging
import subprocess

import pytest
import torch

from tests.conftest import compose_config, tiny_overrides
from vpt_dml.checkpoints import load_checkpoint
from vpt_dml.errors import Diverged
from vpt_dml.run import train
from vpt_dml.runs.checkpoint_io import AtomicCheckpointIO, DiskFull


@pytest.fixture
def small_disk(tmp_path):
    """A real 400 KiB file system (tmpfs): room for one tiny checkpoint (~240 KiB), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {res.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


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
