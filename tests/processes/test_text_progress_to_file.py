"""Progress for logs that are files: a run with stdout in a file logs its epochs and
metrics as plain lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_overrides


@pytest.mark.slow
def test_run_with_stdout_in_a_file_logs_epochs_and_metrics(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = tiny_overrides(
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=true",
        f"hydra.run.dir={run_dir}",
        f"paths.data_dir={tmp_path / 'data'}",
    )
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    log_file = tmp_path / "job.out"
    with log_file.open("w") as out:  # what `python -m vpt_dml.run ... > job.out` gives
        proc = subprocess.run(
            [sys.executable, "-m", "vpt_dml.run", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            timeout=600,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in (log_file.read_text(), (run_dir / "run.log").read_text()):
        for epoch in (0, 1):
            assert re.search(rf"epoch {epoch}/1 done .*\| loss \d+\.\d+ \(epoch mean\)", text)
            assert re.search(rf"eval val \(epoch {epoch}\): .*recall@1 \d\.\d{{4}}", text)
        assert re.search(r"eval test: .*recall@1 \d\.\d{4}", text)
        assert "img/s" in text and "ETA" in text
