"""Child processes for tests and experiments/: a free port, the environment, a process
group of their own, and a kill that nothing of the group outlives.

Every child starts in its own session (`start_new_session=True`), so a DDP launcher's
ranks and DataLoader workers are one process group: `killpg` reaches all of them, and a
timeout, a failed assertion or pytest-timeout's exception in the test leaves no orphan
holding a port or a core. Imported by tests as `from processes import ...` (tests/ is on
the path) and by experiments/ scripts as `from tests.processes import ...`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What every child of the suite gets: no network, no W&B, output as it happens.
QUIET = {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
# Env keys a child must not inherit from a DDP test process (it would think it is a rank).
RANK_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_WORLD_SIZE")


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now (for MASTER_PORT / torchrun)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: Mapping[str, str] | None = None, *, ddp: bool = False) -> dict[str, str]:
    """os.environ with the suite's settings; this repository first on PYTHONPATH (a child
    runs the same tree as its test); `ddp=True` adds MASTER_ADDR and a free MASTER_PORT.
    Keys of `extra` win; a PYTHONPATH in `extra` is put before the repository."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_KEYS}
    env.update(QUIET)
    if ddp:
        env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    extra = dict(extra or {})
    paths = [extra.pop("PYTHONPATH", None), str(REPO), os.environ.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    env.update(extra)
    return env


def kill_group(proc: subprocess.Popen, grace_s: float = 0.0) -> None:
    """SIGTERM the child's group (after `grace_s`, SIGKILL), then reap the child. Safe to
    call twice and on a child that has exited (its group may still hold ranks/workers)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if grace_s > 0:
            os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


@contextlib.contextmanager
def started(
    argv: Sequence[str],
    *,
    cwd: Path | str = REPO,
    env: Mapping[str, str] | None = None,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text: bool = True,
) -> Iterator[subprocess.Popen]:
    """A running child in its own process group; on leaving the block (normally or by any
    exception) the whole group is killed and the child reaped."""
    proc = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=dict(env) if env is not None else child_env(),
        stdout=stdout,
        stderr=stderr,
        text=text,
        start_new_session=True,  # its own process group: killpg reaches ranks and workers
    )
    try:
        yield proc
    finally:
        kill_group(proc)
        for stream in (proc.stdout, proc.stderr, proc.stdin):
            if stream is not None:
                stream.close()


def run(
    argv: Sequence[str],
    *,
    cwd: Path | str = REPO,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
    settle_s: float = 0.0,
) -> subprocess.CompletedProcess:
    """subprocess.run with the child in its own group: on a timeout (raised as
    subprocess.TimeoutExpired) or any other exception every process of the group is
    killed. `settle_s`: wait that long after the child exits for the rest of its group
    (e.g. a DDP rank finishing its last line) before the group is killed."""
    with started(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            kill_group(proc)
            e.output, e.stderr = proc.communicate()
            raise
        if settle_s:
            time.sleep(settle_s)
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def python(*args: str) -> list[str]:
    """argv of this interpreter (the venv's) with `args`."""
    return [sys.executable, *args]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until `path` exists; fails early with the child's stderr if it ends first."""
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            tail = proc.stderr.read()[-3000:] if proc.stderr else ""
            raise AssertionError(f"the child ended (exit {proc.returncode}) early: {tail}")
        if time.monotonic() > end:
            raise AssertionError(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.2)
