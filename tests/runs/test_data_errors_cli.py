"""Bad dataset copies through the command line (in process): a wrong root ends with one
clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, cli_in_process, tiny_overrides


@pytest.mark.slow
def test_cli_wrong_root_ends_with_one_line(tmp_path: Path):
    args = tiny_overrides(
        "data=cub", f"data.root={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'run'}"
    )
    args = [a for a in args if not a.startswith("data.synthetic")]
    proc = cli_in_process(args, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: data.root")
    assert "Traceback" not in proc.stderr
