"""A sweep (-m) with multi-device DDP is refused in one line, through the command line in
process (the sweeps themselves, in child processes: tests/processes/test_sweep.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import cli_in_process, tiny_overrides


@pytest.mark.slow
def test_sweep_with_multi_device_ddp_is_refused(tmp_path: Path) -> None:
    args = [
        "-m",
        *tiny_overrides(),
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "seed=0,1",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    proc = cli_in_process(args, cwd=tmp_path)
    assert proc.returncode == 2
    assert "error: a sweep (-m) cannot run trainer.strategy=ddp" in proc.stderr
