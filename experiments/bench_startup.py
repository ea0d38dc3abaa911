"""How long the commands take before they do anything, and one tiny run in process.

Each command runs in a fresh interpreter (best of --repeats); the baseline in the same run
is `python -c "import torch"`, the floor of any command that touches a model. A tiny run
is the test suite's tiny config (tests/conftest.py) trained in this process, the first run
left out (it pays the imports). Prints a table of seconds and ratios to the baseline, then
one JSON line.

    python experiments/bench_startup.py [--repeats 3] [--runs 4]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "import torch (baseline)": ["-c", "import torch"],
    "run -sc install=bash": ["-m", "vpt_dml.run", "-sc", "install=bash"],
    "run --help": ["-m", "vpt_dml.run", "--help"],
    "report --help": ["-m", "vpt_dml.report", "--help"],
    "export --help": ["-m", "vpt_dml.export", "--help"],
    "retrieve --help": ["-m", "vpt_dml.retrieve", "--help"],
}


def best_of(args: list[str], repeats: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return min(times)


def tiny_runs(n: int) -> list[float]:
    sys.path[:0] = [str(REPO / "tests"), str(REPO)]
    os.environ.update({"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"})
    import conftest

    from vpt_dml.run import train

    root, times = Path(tempfile.mkdtemp()), []
    for i in range(n + 1):
        cfg = conftest.compose_config(
            conftest.tiny_overrides("eval_before_training=false"), root / str(i)
        )
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            start = time.perf_counter()
            train(cfg)
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()
    print(f"load before: {os.getloadavg()}")
    seconds = {name: best_of(argv, args.repeats) for name, argv in COMMANDS.items()}
    base = seconds["import torch (baseline)"]
    for name, s in seconds.items():
        print(f"{name:28s} {s:6.2f} s  {s / base:5.2f}x the baseline")
    runs = tiny_runs(args.runs)
    print(
        f"tiny run in process: {', '.join(f'{t:.2f}' for t in runs)} s (median {sorted(runs)[len(runs) // 2]:.2f})"
    )
    print(f"load after: {os.getloadavg()}")
    print(json.dumps({"seconds": seconds, "tiny_runs": runs, "baseline_s": base}))


if __name__ == "__main__":
    main()
