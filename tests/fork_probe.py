"""`python -m tests.fork_probe [EXIT_CODE|wait] [ATEXIT_FILE]`: what a child sees of
itself, as one JSON line on stdout (tests/test_suite_guards.py runs it fresh and forked
from the fork server, and compares). `wait` sleeps until SIGTERM, then exits 143."""

import atexit
import json
import os
import signal
import sys
import time

import __main__


def main() -> None:
    action = sys.argv[1] if len(sys.argv) > 1 else "0"
    if action == "wait":  # before the line the test waits for
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if len(sys.argv) > 2:  # interpreter shutdown runs the child's own atexit handlers
        atexit.register(lambda: open(sys.argv[2], "w").write("atexit ran"))
    seen = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "sid": os.getsid(0),
        "pgid": os.getpgid(0),
        "cwd": os.getcwd(),
        "path0": sys.path[0],
        "argv": sys.argv,
        "main_spec": getattr(__main__.__spec__, "name", None),
        "probe_env": os.environ.get("PROBE"),
        "threads": len(os.listdir("/proc/self/task")),
    }
    print(json.dumps(seen), flush=True)
    print("a line on stderr", file=sys.stderr, flush=True)
    if action == "wait":
        time.sleep(120)
    sys.exit(int(action) if action != "wait" else 1)


if __name__ == "__main__":
    main()
