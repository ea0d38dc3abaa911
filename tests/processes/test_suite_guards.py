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


GROUPED = """
import os, time, pytest

def record(name):
    with open("workers.txt", "a") as f:
        f.write(f"{name} {os.environ['PYTEST_XDIST_WORKER']}\\n")
    time.sleep(0.5)

@pytest.mark.xdist_group("processes")
@pytest.mark.parametrize("i", range(3))
def test_heavy(i):
    record(f"heavy{i}")

@pytest.mark.parametrize("i", range(3))
def test_free(i):
    record(f"free{i}")
"""


def test_an_xdist_group_runs_on_one_worker(tmp_path: Path):
    """Two DDP tests at once on 2 cores time out; `--dist loadgroup` keeps a group on one
    worker (pytest-xdist 3.8 under pytest 9 did not: the conftest names the groups)."""
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    argv = python("-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider")
    argv += ["-n", "2", "--dist", "loadgroup", "--rootdir", str(tmp_path)]
    argv += ["-c", str(REPO / "pyproject.toml"), str(tmp_path)]
    res = run(argv, cwd=tmp_path, timeout=240)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    workers = dict(line.split() for line in (tmp_path / "workers.txt").read_text().splitlines())
    assert len(workers) == 6
    assert len({workers[f"heavy{i}"] for i in range(3)}) == 1, workers
