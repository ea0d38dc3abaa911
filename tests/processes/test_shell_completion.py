"""A day-one option (issue 19, findings 10 and 11): the shell completion Hydra installs
completes `python -m vpt_dml.run` lines in a real bash."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


@pytest.mark.slow
def test_shell_completion_install_script_completes_python_m(tmp_path: Path):
    """`eval "$(python -m vpt_dml.run -sc install=bash)"`, then TAB after
    `python -m vpt_dml.run data=` offers the data options (README, "Shell completion")."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    python = shlex.quote(sys.executable)
    script = f"""
eval "$({python} -m vpt_dml.run -sc install=bash)"
complete -p python | grep -q _vpt_dml_run_complete || exit 3
tab() {{  # what bash sets before calling a completion function
    COMP_LINE="$1"; COMP_POINT=${{#1}}; read -ra COMP_WORDS <<< "$1"
    [[ "$1" == *" " ]] && COMP_WORDS+=("")
    COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
    COMPREPLY=(); _vpt_dml_run_complete; echo "${{COMPREPLY[*]}}"
}}
tab "{python} -m vpt_dml.run data=s"
tab "{python} -m vpt_dml.run trainer.max_ep"
tab "{python} -m vpt_dml.export out"
"""
    res = subprocess.run(
        ["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    data, key, other = res.stdout.splitlines()
    assert data.split() == ["data=sop", "data=synthetic"]
    assert key.split() == ["trainer.max_epochs="]
    assert other == ""  # other modules: the shell's default (file names)
