"""The layered layout (issue 29): one rank-zero test, so a second node's process prints
no error line (a real child with the launcher's variables)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli, tiny_overrides


@pytest.mark.slow
def test_second_node_prints_no_error_line(tmp_path: Path):
    """Every rank hits the same config error; only global rank 0 prints it (NODE_RANK=1
    LOCAL_RANK=0 printed it too: a second `error:` line per node)."""
    args = [*tiny_overrides("+optim.learning_rate=1"), f"hydra.run.dir={tmp_path / 'run'}"]
    first = run_cli(args, tmp_path, env={"NODE_RANK": "0", "LOCAL_RANK": "0"})
    second = run_cli(args, tmp_path, env={"NODE_RANK": "1", "LOCAL_RANK": "0"})
    assert first.returncode == second.returncode == 2
    assert "error: unknown config key optim.learning_rate" in first.stderr
    assert "error:" not in second.stderr, second.stderr
    # and the second node never claims the run folder
    assert not (tmp_path / "run" / "run.lock").exists()
