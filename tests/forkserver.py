"""A fork server for the suite's child processes: one process that has imported torch,
Lightning, Hydra, timm, faiss and vpt_dml's own modules (about 7 s of CPU on a 2-core
machine, each time a fresh `python -m vpt_dml.run` starts) forks a child per request, and
the child runs `python -m MODULE ARGS` (or `python SCRIPT ARGS`) from there: its own PID, session and process group,
the requested cwd, environment and stdin/stdout/stderr, real signals and a real exit code.

Run as `python tests/forkserver.py SOCKET` (tests/processes.py starts one per pytest
process, on first use). Protocol, one request per connection on the Unix socket:
- the client sends an 8-byte length, then that much JSON ({"module" or "script",
  "args", "cwd", "env"}), with its stdin, stdout and stderr file descriptors attached (SCM_RIGHTS);
- the server answers with the child's PID (4 bytes), and when the child ends, with its
  exit status as subprocess.Popen.returncode says it (4 bytes: a negative number for a
  signal).

Forking is safe here because the server never runs torch code: after the imports it has
one thread and no OpenMP pool (tests/test_suite_guards.py checks both). What a fresh
interpreter would read from the environment while importing (ranks, thread counts,
PYTHON*) would be the server's, not the child's: tests/processes.py starts such requests
as real processes instead (processes.FORK_UNSAFE_ENV).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import runpy
import select
import socket
import struct
import sys
import threading
import traceback

# What `python -m vpt_dml.run` (and the other commands) import before doing anything.
# vpt_dml.run itself is left out: runpy runs it as __main__, as `python -m` would.
PRELOAD = (
    "torch",
    "lightning",
    "timm",
    "hydra",
    "omegaconf",
    "faiss",
    "submitit",
    "vpt_dml.runs.lifecycle",
    "vpt_dml.runs.sigterm",
    "vpt_dml.runs.sweep",
    "vpt_dml.runs.search",
    "vpt_dml.runs.cluster",
    "vpt_dml.runs.completion",
    "vpt_dml.runs.callbacks.wandb_logger",
    "vpt_dml.runs.callbacks.divergence",
    "vpt_dml.train",
    "hydra_plugins.vpt_dml_launcher",
)
HEADER = struct.Struct("!Q")
STATUS = struct.Struct("!i")


def receive(conn: socket.socket) -> tuple[dict, list[int]]:
    """One request: its JSON and the three file descriptors that came with it."""
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while len(data) < HEADER.size:
        data += conn.recv(1 << 16)
    (length,) = HEADER.unpack_from(data)
    body = data[HEADER.size :]
    while len(body) < length:
        chunk = conn.recv(1 << 16)
        if not chunk:
            raise ConnectionError("request cut short")
        body += chunk
    return json.loads(body), list(fds)


def exit_code(e: SystemExit) -> int:
    """What the interpreter would exit with for this SystemExit."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def run_child(request: dict, fds: list[int]) -> None:
    """In the forked child: become `python -m MODULE ARGS` and never return."""
    code = 1
    try:
        os.setsid()  # its own session and process group, as start_new_session=True
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in set(fds):
            if fd > 2:
                os.close(fd)
        env = request["env"]
        os.environ.clear()
        os.environ.update(env)
        os.chdir(request["cwd"])
        # PYTHONPATH entries the server was started without (e.g. a test's callbacks)
        extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[1:1] = [p for p in extra if p not in sys.path]
        sys.path[0] = os.getcwd()  # `python -m` puts the working folder first
        if env.get("PYTHONUNBUFFERED"):
            for stream in (sys.stdout, sys.stderr):
                stream.reconfigure(line_buffering=True, write_through=True)
        try:
            if request.get("script"):  # `python path/to/script.py ARGS`
                sys.argv = [request["script"], *request["args"]]
                sys.path[0] = os.path.dirname(os.path.abspath(request["script"]))
                runpy.run_path(request["script"], run_name="__main__")
            else:  # `python -m MODULE ARGS`; runpy puts the module's file in argv[0]
                sys.argv = [request["module"], *request["args"]]
                sys.modules.pop(request["module"], None)
                runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = exit_code(e)
        except KeyboardInterrupt:
            traceback.print_exc()
            code = 130
        except BaseException:  # noqa: BLE001 - the interpreter's own last words
            traceback.print_exc()
            code = 1
        # what interpreter shutdown does, in its order: join non-daemon threads, atexit
        with contextlib.suppress(BaseException):
            threading._shutdown()  # noqa: SLF001
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()  # noqa: SLF001
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(code)


def serve(path: str) -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    parent = os.getppid()
    print("ready", flush=True)
    waiting: dict[int, socket.socket] = {}
    while os.getppid() == parent:  # the pytest process that started it is gone: stop
        ready, _, _ = select.select([listener], [], [], 0.05)
        if ready:
            conn, _ = listener.accept()
            try:
                request, fds = receive(conn)
            except (OSError, ValueError, ConnectionError):
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                for other in waiting.values():
                    other.close()
                run_child(request, fds)
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(OSError):
                conn.sendall(STATUS.pack(pid))
            waiting[pid] = conn
        while waiting:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = waiting.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(STATUS.pack(os.waitstatus_to_exitcode(status)))
                conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
