"""The suite's own guards (tests/conftest.py, tests/processes.py): a hang is a failure with
a traceback and the session goes on; a hang the per-test timeout cannot interrupt still
ends, with every thread's stack; a child's whole process group dies with its test."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from processes import REPO, child_env, python, run, started

HANGS = """
import signal, threading, time
import pytest

@pytest.mark.timeout(2)
def test_hangs_on_a_lock():
    threading.Event().wait()  # the Pool deadlock of issue 30 waited like this

def test_after_it_runs():
    pass

@pytest.mark.timeout(1)
def test_blocked_where_sigalrm_cannot_reach():
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
    time.sleep(600)
"""


def pytest_in_child(tmp_path: Path, *args: str, env: dict | None = None):
    (tmp_path / "test_hangs.py").write_text(HANGS)
    argv = python("-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", *args)
    argv += ["--rootdir", str(tmp_path), "-c", str(REPO / "pyproject.toml"), str(tmp_path)]
    return run(argv, cwd=tmp_path, env=child_env(env), timeout=240)


def test_a_hang_fails_with_its_traceback_and_the_session_goes_on(tmp_path: Path):
    res = pytest_in_child(tmp_path, "-k", "not blocked")
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-3000:]
    assert "Timeout (>2.0s)" in out and "threading.Event().wait()" in out, out[-3000:]
    assert "1 failed, 1 passed" in out, out[-3000:]


def test_a_hang_sigalrm_cannot_reach_still_ends_with_every_stack(tmp_path: Path):
    started_at = time.monotonic()
    res = pytest_in_child(tmp_path, "-k", "blocked", env={"VPT_TEST_HARD_STOP_S": "3"})
    assert time.monotonic() - started_at < 120  # not the test's 600 s
    assert res.returncode != 0
    assert "test_blocked_where_sigalrm_cannot_reach" in res.stderr, res.stderr[-3000:]
    assert "Current thread" in res.stderr or "Thread 0x" in res.stderr, res.stderr[-3000:]


GRANDPARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(600)
"""


def test_leaving_started_kills_the_childs_whole_process_group():
    with started(python("-c", GRANDPARENT), stdout=-1) as proc:
        grandchild = int(proc.stdout.readline())
        assert os.getpgid(grandchild) == proc.pid  # its own group, the grandchild in it
    # the grandchild is the init process's now: gone (or a zombie) soon after SIGKILL
    for _ in range(50):
        try:
            state = Path(f"/proc/{grandchild}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            break
        if state in ("Z", "X"):
            break
        time.sleep(0.1)
    else:
        os.kill(grandchild, signal.SIGKILL)
        raise AssertionError(f"grandchild {grandchild} outlived its test")
