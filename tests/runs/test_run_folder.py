"""A run folder belongs to one run: lock, earlier results, stale locks, CSV history."""

from __future__ import annotations

import csv
import hashlib
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, cli_in_process, tiny_overrides

from vpt_dml.errors import UserError
from vpt_dml.runs import folder as run_folder
from vpt_dml.runs.callbacks.loggers import AppendingCSVLogger


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the SHA-256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def one_error_line(res, expected: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr


# -- in-process ---------------------------------------------------------------------------
def test_claim_refuses_a_finished_run_unless_resumed_or_overwritten(finished_run, tmp_path):
    with pytest.raises(UserError, match="already holds a finished run"):
        run_folder.claim(finished_run)
    # a resume of that run, from its own checkpoint, may continue it
    run_folder.claim(finished_run, ckpt_path=str(finished_run / "checkpoints" / "last.ckpt"))
    run_folder.release(finished_run)
    # a checkpoint from elsewhere is not a resume of this folder's run
    with pytest.raises(UserError, match="already holds a finished run"):
        run_folder.claim(finished_run, ckpt_path=str(tmp_path / "other" / "last.ckpt"))

    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(finished_run), str(copy)], check=True)
    run_folder.claim(copy, overwrite=True)
    assert not (copy / "metrics.json").exists() and not (copy / "checkpoints").exists()
    assert (copy / run_folder.LOCK).is_file()
    run_folder.release(copy)
    assert not (copy / run_folder.LOCK).exists()


def test_csv_history_is_appended_not_replaced(tmp_path: Path):
    first = AppendingCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    first.log_metrics({"val/recall@1": 0.5}, step=0)
    first.save()
    resumed = AppendingCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    resumed.log_metrics({"val/recall@1": 0.6}, step=1)
    resumed.log_metrics({"train/loss": 2.0}, step=2)  # a column the old rows lack
    resumed.save()
    with (tmp_path / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["0", "1", "2"]
    assert [r["val/recall@1"] for r in rows] == ["0.5", "0.6", ""]
    assert rows[2]["train/loss"] == "2.0"


# -- through the CLI ----------------------------------------------------------------------
@pytest.mark.slow
def test_second_run_into_a_finished_folder_touches_nothing(finished_run: Path, tmp_path: Path):
    before = snapshot(finished_run)
    res = cli_in_process(
        [*tiny_overrides(), f"hydra.run.dir={finished_run}", f"paths.data_dir={tmp_path}"],
        cwd=REPO,
    )
    one_error_line(res, "already holds a finished run")
    assert snapshot(finished_run) == before  # metrics.json, checkpoints, CSV: byte-identical
