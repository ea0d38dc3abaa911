"""Progress for logs that are files: a run with stdout in a file logs its epochs and
metrics as plain lines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from processes import python, started

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
    log_file = tmp_path / "job.out"
    with log_file.open("w") as out:  # what `python -m vpt_dml.run ... > job.out` gives
        with started(python("-m", "vpt_dml.run", *args), cwd=REPO, stdout=out) as proc:
            _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    for text in (log_file.read_text(), (run_dir / "run.log").read_text()):
        for epoch in (0, 1):
            assert re.search(rf"epoch {epoch}/1 done .*\| loss \d+\.\d+ \(epoch mean\)", text)
            assert re.search(rf"eval val \(epoch {epoch}\): .*recall@1 \d\.\d{{4}}", text)
        assert re.search(r"eval test: .*recall@1 \d\.\d{4}", text)
        assert "img/s" in text and "ETA" in text
