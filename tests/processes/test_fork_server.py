"""The fork server (tests/forkserver.py, tests/processes.py): a child forked from it is
what a fresh `python -m MODULE` would be, as the tests use a child: its own PID, session
and process group, cwd, environment, argv, `__main__`, stdout/stderr, exit code, signals
and atexit handlers; and what the server cannot give (an import-time environment) goes to
a fresh interpreter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from processes import child_env, forkable, python, run, started

PROBE = ("-m", "tests.fork_probe")


def seen(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.splitlines()[0])


@pytest.mark.parametrize(("form", "code"), [("module", 0), ("module", 3), ("script", 0)])
def test_a_forked_child_is_what_a_fresh_interpreter_is(tmp_path: Path, form, code) -> None:
    env = child_env({"PROBE": "from the test"})
    script = Path(__file__).parents[1] / "fork_probe.py"
    command = PROBE if form == "module" else (str(script),)
    results = {}
    for fork in (True, False):
        marker = tmp_path / f"atexit-{fork}"
        assert forkable(python(*command), env)
        proc = run(python(*command, str(code), str(marker)), cwd=tmp_path, env=env, fork=fork)
        results[fork] = (proc, seen(proc), marker)
    for _fork, (proc, info, marker) in results.items():
        assert proc.returncode == code
        assert proc.stderr == "a line on stderr\n"
        assert info["sid"] == info["pid"] == info["pgid"]  # its own session and group
        assert info["pid"] != os.getpid()
        assert info["cwd"] == str(tmp_path.resolve())
        assert info["probe_env"] == "from the test"
        if form == "module":  # what Lightning's DDP launcher reads to start the other ranks
            assert info["main_spec"] == "tests.fork_probe"
            assert info["path0"] == str(tmp_path.resolve())
        else:
            assert info["main_spec"] is None
            assert info["path0"] == str(script.parent)
        assert info["argv"][1:] == [str(code), str(marker)]
        assert info["threads"] == 1  # nothing of the server's threads (it has none)
        assert marker.read_text() == "atexit ran"
    forked, fresh = results[True][1], results[False][1]
    assert forked["ppid"] != fresh["ppid"]  # one came from the server, one from this test
    assert Path(forked["argv"][0]).resolve() == Path(fresh["argv"][0]).resolve()


def test_a_forked_child_dies_of_signals_and_its_handlers_run(tmp_path: Path) -> None:
    with started(python(*PROBE, "wait"), cwd=tmp_path, stdout=subprocess.PIPE) as proc:
        info = json.loads(proc.stdout.readline())
        assert proc.pid == info["pid"]
        os.killpg(proc.pid, signal.SIGTERM)  # the group, as the SIGTERM tests do
        assert proc.wait(timeout=30) == 143  # the child's own Python handler ran
    with started(python(*PROBE, "wait"), cwd=tmp_path, stdout=subprocess.PIPE) as proc:
        proc.stdout.readline()
        proc.kill()
        assert proc.wait(timeout=30) == -signal.SIGKILL
    with started(python(*PROBE, "wait"), cwd=tmp_path) as proc:
        start = time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)
        assert proc.poll() is None
        assert time.monotonic() - start < 10


@pytest.mark.parametrize(
    "extra",
    [{"OMP_NUM_THREADS": "7"}, {"RANK": "1"}, {"SLURM_PROCID": "1"}, {"PYTHONHASHSEED": "1"}],
)
def test_what_an_interpreter_reads_while_starting_gets_a_fresh_one(extra: dict) -> None:
    cmd = python("-m", "vpt_dml.run", "--help")
    assert forkable(cmd, child_env())
    assert not forkable(cmd, child_env(extra))
    # a SLURM job's other keys and rank 0 are read at run time, as the server's would be
    assert forkable(cmd, child_env({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0"}))


def test_the_server_has_one_thread_after_its_imports(tmp_path: Path) -> None:
    """Forking a process with threads (an OpenMP pool, a logger's thread) can deadlock the
    child on a lock another thread held: the server must have none."""
    import processes

    run(python(*PROBE, "0"), cwd=tmp_path)  # the server is up
    server = processes._server["proc"]
    assert len(os.listdir(f"/proc/{server.pid}/task")) == 1
    modules = Path(f"/proc/{server.pid}/maps").read_text()
    assert "libtorch_cpu" in modules  # the imports are done in the server, once
