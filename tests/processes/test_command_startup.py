"""The commands that read, evaluate or serve a run start without Lightning (~3 s of imports of its
own, and torchmetrics, transformers and scipy with it): `vpt_dml.report` reads JSON and
CSV, `export` / `embed` / `retrieve` need torch and timm only. Checked in a fresh
interpreter, which has imported nothing yet."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

COMMANDS = ["report", "export", "embed", "retrieve", "index", "evaluate", "compare"]
PROBE = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(f"vpt_dml.{name}")
    print(name, "lightning" in sys.modules, flush=True)
"""


def test_commands_that_read_or_serve_a_run_import_no_lightning():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-c", PROBE, *COMMANDS],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    imported = dict(line.split() for line in res.stdout.splitlines())
    assert imported == {name: "False" for name in COMMANDS}, imported
