"""Issue 19 finding 9: a full disk leaves every checkpoint whole, says so in one line, and
is announced at start-up; checkpoints are written to a temporary name and renamed."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest
import torch

from vpt_dml.errors import Diverged
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
