"""check_config through the command line (in process): a refused config ends in one line
before anything runs (the checks themselves: tests/unit/test_config_checks.py)."""

from __future__ import annotations

import pytest
from conftest import REPO, cli_in_process, tiny_overrides


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "expected"),
    [("+optim.learning_rate=1e-3", "optim.lr"), ("trainer.max_epochs=abc", "trainer.max_epochs")],
)
def test_cli_refuses_before_anything_runs(override, expected, tmp_path):
    run_dir = tmp_path / "run"
    res = cli_in_process(
        [*tiny_overrides(override), f"hydra.run.dir={run_dir}", f"paths.data_dir={tmp_path}/d"],
        cwd=REPO,
    )
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "d").exists()  # nothing ran: not even the data was generated
