"""experiments/gpu_check.py: its tiny layouts are written while another thread is importing
(a child process with a stalling import)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest

from tests.unit.test_gpu_check import REPO, _env

# A thread of this process is running `import PIL.Image` (it holds that module's import
# lock, not the global one) when write_layouts starts its Pool; each worker then imports
# PIL.Image. A forked worker inherits the lock held by a thread it does not have and waits
# forever (what hung pytest: issue 30); a spawned one starts clean. Run in a fresh
# interpreter, so the import is really in flight, and killed with its workers if it hangs.
_IMPORT_IN_FLIGHT = """
import importlib.abc, importlib.util, sys, threading
from pathlib import Path

repo, out = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(repo))
spec = importlib.util.spec_from_file_location("gpu_check", repo / "experiments" / "gpu_check.py")
gc = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gc
spec.loader.exec_module(gc)
assert "PIL.Image" not in sys.modules, "the parent must not need PIL.Image"
entered, release = threading.Event(), threading.Event()


class StallingLoader(importlib.abc.Loader):
    def __init__(self, real):
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):  # runs under the module's lock only
        entered.set()
        release.wait()
        self.real.exec_module(module)


class Stall(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "PIL.Image" or threading.current_thread() is threading.main_thread():
            return None
        sys.meta_path.remove(self)
        found = importlib.util.find_spec(name)
        found.loader = StallingLoader(found.loader)
        return found


sys.meta_path.insert(0, Stall())
thread = threading.Thread(target=lambda: __import__("PIL.Image"), daemon=True)
thread.start()
entered.wait()
layouts = gc.write_layouts(out, tiny=True, procs=2)
release.set()
thread.join()
print("written", sum(v.train_images + v.test_images for v in layouts.values()))
"""


@pytest.mark.timeout(120)
def test_layouts_are_written_while_another_thread_is_importing(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _IMPORT_IN_FLIGHT, str(REPO), str(tmp_path / "data")],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its Pool workers too are killed below
    )
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"write_layouts hung with an import in flight in another thread:\n{out}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # workers left behind by a failed run
    assert proc.returncode == 0, out
    assert out.strip().splitlines()[-1] == "written 484"  # SOP 64x2 + 20x5, CUB 64x4
