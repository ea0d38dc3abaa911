"""Commands that start without the training stack, checked in a fresh interpreter (which
has imported nothing yet):
- `python -m vpt_dml.run -sc install=bash` (a shell's startup file runs it) and `--help`
  import no torch, Lightning or timm (~8 s before anything is printed);
- the commands that read, evaluate or serve a run import no Lightning (~3 s of its own,
  and torchmetrics, transformers and scipy with it): `report` reads JSON and CSV,
  `export` / `embed` / `retrieve` / `index` / `evaluate` need torch and timm only."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

RUN_PROBE = """
import atexit, runpy, sys
heavy = ("torch", "lightning", "timm")
atexit.register(lambda: print(sorted(m for m in heavy if m in sys.modules), file=sys.stderr))
sys.argv = ["vpt_dml.run", *sys.argv[1:]]
runpy.run_module("vpt_dml.run", run_name="__main__", alter_sys=True)
"""
COMMANDS = ["report", "export", "embed", "retrieve", "index", "evaluate", "compare"]
IMPORT_PROBE = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(f"vpt_dml.{name}")
    print(name, "lightning" in sys.modules, flush=True)
"""


def fresh_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.parametrize("args", [["-sc", "install=bash"], ["--help"]])
def test_install_script_and_help_answer_without_the_training_stack(args: list[str]):
    res = fresh_python(RUN_PROBE, *args)
    assert res.stdout.strip(), "no answer"
    assert res.stderr.strip().splitlines()[-1] == "[]", res.stderr[-3000:]


def test_commands_that_read_or_serve_a_run_import_no_lightning():
    res = fresh_python(IMPORT_PROBE, *COMMANDS)
    imported = dict(line.split() for line in res.stdout.splitlines())
    assert imported == {name: "False" for name in COMMANDS}, imported
