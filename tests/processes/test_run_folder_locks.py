"""A run folder belongs to one run: the lock of a live process (a real child) is refused,
a stale one (a dead process) is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, cli_in_process, run_cli, tiny_overrides

from tests.runs.test_run_folder import one_error_line, snapshot
from vpt_dml.errors import UserError
from vpt_dml.runs import folder as run_folder


def write_lock(folder: Path, pid: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": socket.gethostname(), "started_utc": "earlier"}
    (folder / run_folder.LOCK).write_text(json.dumps(record))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_claim_refuses_a_live_lock_and_takes_over_a_stale_one(tmp_path, capsys):
    live = tmp_path / "live"
    write_lock(live, os.getppid())  # the process that started pytest: alive, not us
    with pytest.raises(UserError, match="is in use by another run"):
        run_folder.claim(live)
    with pytest.raises(UserError, match="is in use by another run"):
        run_folder.claim(live, overwrite=True)  # overwrite never reaches a live run

    stale = tmp_path / "stale"
    write_lock(stale, dead_pid())
    run_folder.claim(stale)
    assert "took over the stale lock" in capsys.readouterr().err
    assert json.loads((stale / run_folder.LOCK).read_text())["pid"] == os.getpid()
    run_folder.release(stale)


@pytest.mark.slow
def test_second_run_into_a_folder_in_use_touches_nothing(tmp_path: Path):
    run_dir = tmp_path / "run"
    write_lock(run_dir, os.getpid())  # this pytest process plays the first run
    before = snapshot(run_dir)
    res = run_cli(
        [*tiny_overrides(), f"hydra.run.dir={run_dir}", f"paths.data_dir={tmp_path}"], cwd=REPO
    )
    one_error_line(res, "is in use by another run")
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_stale_lock_is_taken_over_and_released(tmp_path: Path):
    run_dir = tmp_path / "run"
    write_lock(run_dir, dead_pid())
    res = cli_in_process(
        [
            *tiny_overrides("eval_before_training=false"),
            f"hydra.run.dir={run_dir}",
            f"paths.data_dir={tmp_path / 'data'}",
        ],
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "warning: took over the stale lock" in res.stderr
    assert (run_dir / "metrics.json").is_file()
    assert not (run_dir / run_folder.LOCK).exists()  # released when the run ended
