"""Child processes of the check: the environment they run in, their logs, their timeouts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "gpu_check.py"


def child_env(cpu: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_logged(cmd: list[str], log_path: Path, cpu: bool, timeout: float) -> int | str:
    """`cmd` in the repo with its output in `log_path`: the exit code, or "timeout"."""
    try:
        with log_path.open("w") as log:
            return subprocess.run(
                cmd,
                cwd=REPO,
                env=child_env(cpu),
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=max(timeout, 1),
            ).returncode
    except subprocess.TimeoutExpired:
        return "timeout"
