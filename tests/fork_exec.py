"""`python tests/fork_exec.py ARGS`: `python ARGS`, forked from the fork server of the
pytest process above (tests/forkserver.py) when processes.forkable allows it, else exec'd
as it is.

For the programs of ours that start Python themselves: submitit's local executor starts
each job as `PYTHON -u -m submitit.core._submit FOLDER`, and hydra/launcher=local takes
PYTHON from VPT_LOCAL_PYTHON (vpt_dml/runs/submitit_launcher.py); the tests set it to
this script. This process stays the job's process for submitit: it forwards the signals
it gets (SIGTERM, SIGINT, SIGUSR1, SIGUSR2) to the forked child and ends as it ended.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import processes  # noqa: E402 - stdlib only: this process imports no torch


def main(args: list[str]) -> None:
    env = dict(os.environ)
    if args[:1] == ["-u"]:  # the fork server's child applies PYTHONUNBUFFERED itself
        args, env["PYTHONUNBUFFERED"] = args[1:], "1"
    # submitit's empty CUDA_VISIBLE_DEVICES (no GPU asked) is the child's, but not a reason
    # for a fresh interpreter: torch reads it when CUDA starts, which the server's imports
    # never do (its torch.cuda is not initialised)
    compared = {k: v for k, v in env.items() if (k, v) != ("CUDA_VISIBLE_DEVICES", "")}
    argv = [sys.executable, *args]
    if not processes.forkable(argv, compared):
        os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
    child = processes.forked(argv, cwd=os.getcwd(), env=env)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, lambda n, _frame: child.send_signal(n))
    code = child.wait()
    if code < 0:  # died of a signal: so does this process
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
