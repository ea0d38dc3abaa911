"""Child processes for tests and experiments/: a free port, the environment, a process
group of their own, and a kill that nothing of the group outlives.

Every child starts in its own session (`start_new_session=True`), so a DDP launcher's
ranks and DataLoader workers are one process group: `killpg` reaches all of them, and a
timeout, a failed assertion or pytest-timeout's exception in the test leaves no orphan
holding a port or a core. Imported by tests as `from processes import ...` (tests/ is on
the path) and by experiments/ scripts as `from tests.processes import ...`.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What every child of the suite gets: no network, no W&B, output as it happens.
QUIET = {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
# hydra/launcher=local starts each job through tests/fork_exec.py: forked from the fork
# server like the test's own children (vpt_dml/runs/submitit_launcher.LOCAL_PYTHON_ENV)
LOCAL_JOBS_FORKED = {"VPT_LOCAL_PYTHON": f"{sys.executable} {REPO / 'tests' / 'fork_exec.py'}"}
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
    env = {k: v for k, v in os.environ.items() if k not in RANK_KEYS and k != _SOCKET_ENV}
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


def launch(
    argv: Sequence[str],
    *,
    cwd: Path | str = REPO,
    env: Mapping[str, str] | None = None,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text: bool = True,
    fork: bool = True,
) -> subprocess.Popen | ForkedChild:
    """A child in its own process group (what started() manages; the caller reaps it).
    `python -m vpt_dml.X ...` is forked from the fork server (its imports done once; see
    forked()) unless `fork=False` (a test of the command's own wiring: a fresh
    interpreter) or the environment asks for a fresh one (FORK_UNSAFE_ENV)."""
    env = dict(env) if env is not None else child_env()
    if fork and forkable(argv, env):
        return forked(argv, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=text)
    return subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=env,
        stdout=stdout,
        stderr=stderr,
        text=text,
        start_new_session=True,  # its own process group: killpg reaches ranks and workers
    )


@contextlib.contextmanager
def started(argv: Sequence[str], **options) -> Iterator[subprocess.Popen]:
    """launch(argv, **options)'s child; on leaving the block (normally or by any exception)
    the whole group is killed and the child reaped."""
    proc = launch(argv, **options)
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
    fork: bool = True,
) -> subprocess.CompletedProcess:
    """subprocess.run with the child in its own group: on a timeout (raised as
    subprocess.TimeoutExpired) or any other exception every process of the group is
    killed. `settle_s`: wait that long after the child exits for the rest of its group
    (e.g. a DDP rank finishing its last line) before the group is killed. `fork`: as
    started()'s."""
    with started(
        argv,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        fork=fork,
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


# == the fork server (tests/forkserver.py) ==================================================
# A fresh `python -m vpt_dml.run` spends about 7 s of CPU importing torch, Lightning (which
# brings torchmetrics, transformers, scipy), timm and Hydra before it reads its first
# argument; the suite starts dozens. The fork server imports them once per pytest process
# and forks each child from there: a real process (its own PID, session, signals, exit
# code, files), at fork cost. DDP ranks, torchrun workers and submitit jobs that a child
# starts are still fresh interpreters: that launching is what those tests prove.

# Read by the interpreter, the OpenMP runtime or torch while they start or import: a child
# that sets one of these differently from the server gets a fresh interpreter instead.
FORK_UNSAFE_ENV = ("OMP_", "MKL_", "KMP_", "CUDA_", "TORCH_", "LD_", "PYTHON")
# Lightning fixes `rank_zero_only.rank` at import from the first of these that is set
# (lightning/fabric/utilities/rank_zero.py): a child of another rank is started fresh.
IMPORT_RANK_KEYS = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
# The modules a child may run from the server: the suite's commands (and tests/fork_probe)
# submitit.core._submit: a job of hydra/launcher=local, through tests/fork_exec.py
FORKABLE = ("vpt_dml.", "tests.fork_probe", "submitit.core._submit")
FORK_SERVER_ENV = "VPT_TEST_FORK_SERVER"  # "0": every child is a fresh interpreter
_SOCKET_ENV = "VPT_TEST_FORK_SERVER_SOCKET"  # the server of this pytest process
_HEADER = struct.Struct("!Q")
_STATUS = struct.Struct("!i")
_server: dict = {}


def _import_rank(env: Mapping[str, str]) -> str:
    return next((env[k] for k in IMPORT_RANK_KEYS if k in env), "0")


def _unsafe_keys(env: Mapping[str, str], base: Mapping[str, str]) -> list[str]:
    """The keys of `env` an interpreter started with `base` would have read otherwise."""
    keys = {k for k in {*env, *base} if k.startswith(FORK_UNSAFE_ENV)}
    keys -= {"PYTHONPATH", "PYTHONUNBUFFERED"}  # the child applies these itself
    unsafe = sorted(k for k in keys if env.get(k) != base.get(k))
    if _import_rank(env) != _import_rank(base):
        unsafe.append("rank")
    return unsafe


def forkable(argv: Sequence[str], env: Mapping[str, str]) -> bool:
    """`python -m vpt_dml...` or `python SCRIPT.py` with an environment the server's
    imports did not read differently (FORK_UNSAFE_ENV), and the fork server not turned off."""
    argv = list(argv)
    if os.environ.get(FORK_SERVER_ENV, "1") == "0" or len(argv) < 2 or argv[0] != sys.executable:
        return False
    module = argv[1] == "-m" and len(argv) > 2 and argv[2].startswith(FORKABLE)
    script = argv[1].endswith(".py") and Path(argv[1]).is_file()  # a test's own script
    return (module or script) and not _unsafe_keys(env, _server_env())


def _server_env() -> dict[str, str]:
    """The environment the fork server imported with (its socket's folder keeps it, for
    tests/fork_exec.py in a grandchild); this process's own before the server exists."""
    path = os.environ.get(_SOCKET_ENV)
    with contextlib.suppress(OSError, ValueError):
        if path:
            return json.loads(Path(path).with_name("env.json").read_text())
    return child_env()


def _socket_path() -> str:
    """The socket of this process's fork server, started on first use (tests/ and
    tests.processes may both be imported: they share it through the environment)."""
    path = os.environ.get(_SOCKET_ENV)
    if path and os.path.exists(path) and _server.get("owner", os.getpid()) == os.getpid():
        return path
    folder = tempfile.mkdtemp(prefix="vpt_forkserver_")
    path = os.path.join(folder, "socket")
    Path(folder, "env.json").write_text(json.dumps(child_env()))
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "forkserver.py"), path],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a test's killpg never reaches it
    )
    ready, _, _ = select.select([proc.stdout], [], [], 300)
    if not ready or proc.stdout.readline().strip() != "ready":
        kill_group(proc)
        raise RuntimeError("the fork server (tests/forkserver.py) did not start")
    _server.update(proc=proc, owner=os.getpid())
    os.environ[_SOCKET_ENV] = path
    atexit.register(kill_group, proc)
    return path


def _fd_for(spec, default: int, opened: list[int]) -> tuple[int, int | None]:
    """(the child's descriptor, our read end or None) for a Popen-style stdout/stderr."""
    if spec == subprocess.PIPE:
        read, write = os.pipe()
        opened.append(write)
        return write, read
    if spec == subprocess.DEVNULL:
        fd = os.open(os.devnull, os.O_RDWR)
        opened.append(fd)
        return fd, None
    if spec is None:
        return default, None
    return (spec if isinstance(spec, int) else spec.fileno()), None


def forked(
    argv: Sequence[str],
    *,
    cwd: Path | str,
    env: Mapping[str, str],
    stdout=None,
    stderr=None,
    text: bool = True,
) -> ForkedChild:
    """`argv` (python -m MODULE ARGS, python SCRIPT ARGS) forked from the fork server: a
    Popen-like handle."""
    opened: list[int] = []
    stdin = os.open(os.devnull, os.O_RDONLY)
    opened.append(stdin)
    out_fd, out_read = _fd_for(stdout, 1, opened)
    if stderr == subprocess.STDOUT:
        err_fd, err_read = out_fd, None
    else:
        err_fd, err_read = _fd_for(stderr, 2, opened)
    script = argv[1] != "-m"
    request = {
        "module": None if script else argv[2],
        "script": str(Path(argv[1]).resolve()) if script else None,
        "args": list(argv[2:] if script else argv[3:]),
        "cwd": str(Path(cwd).resolve()),
        "env": dict(env),
    }
    body = json.dumps(request).encode()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(_socket_path())
        socket.send_fds(conn, [_HEADER.pack(len(body)) + body], [stdin, out_fd, err_fd])
        pid = _STATUS.unpack(_recv_exactly(conn, _STATUS.size, timeout=120))[0]
    except BaseException:
        conn.close()
        for fd in (out_read, err_read):
            if fd is not None:
                os.close(fd)
        raise
    finally:
        for fd in opened:
            os.close(fd)
    sys.audit("vpt_dml.tests.forked", list(argv))  # conftest's guard counts it as a child

    def wrap(fd: int | None):
        if fd is None:
            return None
        return io.open(fd, "r" if text else "rb")  # noqa: UP020 - a descriptor, not a path

    return ForkedChild(list(argv), pid, conn, wrap(out_read), wrap(err_read))


def _recv_exactly(conn: socket.socket, n: int, timeout: float | None) -> bytes:
    data = b""
    end = None if timeout is None else time.monotonic() + timeout
    while len(data) < n:
        left = None if end is None else max(0.0, end - time.monotonic())
        ready, _, _ = select.select([conn], [], [], left)
        if not ready:
            raise subprocess.TimeoutExpired("fork server", timeout)
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the fork server closed the connection")
        data += chunk
    return data


class ForkedChild:
    """What the tests use of subprocess.Popen, for a child of the fork server: pid,
    returncode, stdout/stderr, poll, wait, communicate, send_signal/terminate/kill. The
    exit status comes from the server, the child's parent (a negative number: a signal)."""

    def __init__(self, args, pid: int, conn: socket.socket, stdout, stderr) -> None:
        self.args, self.pid, self._conn = args, pid, conn
        self.stdin, self.stdout, self.stderr = None, stdout, stderr
        self.returncode: int | None = None
        self._readers: list[threading.Thread] = []
        self._output: dict[str, list] = {}

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.wait(timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                data = _recv_exactly(self._conn, _STATUS.size, timeout)
            except subprocess.TimeoutExpired:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            self.returncode = _STATUS.unpack(data)[0]
            self._conn.close()
        return self.returncode

    def communicate(self, input=None, timeout: float | None = None):  # noqa: A002
        end = None if timeout is None else time.monotonic() + timeout
        if not self._readers:
            for name in ("stdout", "stderr"):
                stream = getattr(self, name)
                if stream is not None:
                    chunks = self._output.setdefault(name, [])
                    reader = threading.Thread(target=_read_all, args=(stream, chunks), daemon=True)
                    reader.start()
                    self._readers.append(reader)
        for reader in self._readers:
            reader.join(None if end is None else max(0.0, end - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if end is None else max(0.0, end - time.monotonic()))

        def joined(name: str):
            if name not in self._output:
                return None
            parts = self._output[name]
            return "".join(parts) if all(isinstance(p, str) for p in parts) else b"".join(parts)

        return joined("stdout"), joined("stderr")

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _read_all(stream, chunks: list) -> None:
    with contextlib.suppress(ValueError, OSError):
        while chunk := stream.read(1 << 16):
            chunks.append(chunk)


# tests/ is on sys.path and the repository too: `processes` and `tests.processes` would be
# two modules with two fork servers; whichever name comes first, both names are this one.
sys.modules.setdefault("processes", sys.modules[__name__])
sys.modules.setdefault("tests.processes", sys.modules[__name__])
