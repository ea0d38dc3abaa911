"""SIGTERM under DDP and with DataLoader workers: one decision, taken together, in bounded time.

Lightning 2.6's own SIGTERM handler runs a `dist.broadcast` inside the signal handler, on
whichever rank got the signal, at whatever point that rank's main thread was: with a
process-group kill (docker stop, SLURM, systemd) each rank's broadcast pairs with some
other collective of the other rank, and the run hung (issue 19, finding 6). DataLoader
workers, forked from the main process, inherit that handler or die of the signal, and the
main process then fails with "DataLoader worker exited unexpectedly".

Here instead:
- the handler only notes the signal (and forwards it to the ranks this process launched);
  in a DataLoader worker it does nothing, so only the main process decides;
- at each training / evaluation batch end every rank all-reduces "did any rank get
  SIGTERM", and all of them set Lightning's flag at the same batch, so Lightning stops
  them at the same point (one SIGTERMException per rank, ExactResume keeps last.ckpt);
- a watchdog armed by the signal ends the process with exit 143 after `timeout_s`
  (env VPT_DML_SIGTERM_TIMEOUT_S, default 120) if it has not stopped by then, e.g. a
  collective whose peer rank is gone never returns. Rank 0 then writes metrics.json
  "status": "interrupted" itself unless the run wrote one after the signal.
- after the run (the guard closed) the command-line process keeps noting SIGTERM instead
  of dying of it: a rank that finished first and died of the group kill made Lightning
  SIGKILL rank 0 before it had written metrics.json (issue 28, item 10);
- at the very end every rank meets once more (`end_together`): none leaves before rank 0
  has written its record, and all of them learn whether any rank got the signal.

Over 400 lines on purpose: the handler, the per-batch shared decision, the end-of-run
meeting of the ranks and the watchdog share one lock and one state (what was received,
when, by which guard); split apart, each would have to reach into the others.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from torch.utils.data import get_worker_info

from vpt_dml import distributed
from vpt_dml.runs.record import Status, write_record

log = logging.getLogger("vpt_dml")

SIGTERM_EXIT = 128 + signal.SIGTERM
TIMEOUT_ENV = "VPT_DML_SIGTERM_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 120.0


# The watchdog (listener thread + timer that ends the process) belongs to the command-line
# process only: `python -m vpt_dml.run` turns it on (run.cli); a process that calls train()
# itself (a notebook, the tests) keeps going after an interrupted run and is never ended.
_COMMAND_LINE = False


_RECEIVED = False  # a SIGTERM was noted by a guard of this process


def sigterm_received() -> bool:
    """True once any guard of this process noted a SIGTERM: one that came too late for the
    run to stop on (its last evaluation, writing metrics.json) must still end the process,
    not let a sweep start its next job."""
    return _RECEIVED


def enable_watchdog() -> None:
    global _COMMAND_LINE
    _COMMAND_LINE = True


def _note_after_run(signum, frame) -> None:
    """SIGTERM once a run of the command-line process is over (its guard closed): noted
    for `end_together` / `sigterm_received`, not a death mid-way through the exit."""
    if get_worker_info() is not None:
        return
    global _RECEIVED
    _RECEIVED = True


def end_together(stopped: bool, timeout_s: float | None = None) -> bool:
    """The last step of a run under DDP, on every rank: wait for the others (so no rank
    exits, and makes its launcher kill the rest, before rank 0 has written metrics.json)
    and return whether any rank was stopped or got SIGTERM, so that all ranks end alike.
    Bounded: a rank that never comes ends this process with 143 after `timeout_s`."""
    mine = bool(stopped or _RECEIVED)
    if distributed.world_size() == 1:
        return mine
    timer = threading.Timer(timeout_s or timeout_from_env(), os._exit, args=(SIGTERM_EXIT,))
    timer.daemon = True
    timer.start()
    try:
        return distributed.any_rank(mine)
    except Exception:  # noqa: BLE001 - a rank already gone (its connection closed)
        return mine
    finally:
        timer.cancel()


def timeout_from_env() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        value = DEFAULT_TIMEOUT_S
    return value if value > 0 else DEFAULT_TIMEOUT_S


class _Connector(_SignalConnector):
    """Lightning's connector (SLURM requeue on SIGUSR1 kept), with SIGTERM left to the guard."""

    def __init__(self, trainer: L.Trainer, guard: SigtermGuard) -> None:
        super().__init__(trainer)
        self.guard = guard

    def register_signal_handlers(self) -> None:
        super().register_signal_handlers()
        # Lightning's notifier (a collective inside a signal handler) replaced by ours
        self._register_signal(signal.SIGTERM, self.guard.handle)

    def teardown(self) -> None:
        super().teardown()
        # between trainer calls (evaluation before training, fit, test) SIGTERM is ours too
        self._register_signal(signal.SIGTERM, self.guard.handle)


# Set by the main process when it exits: its multiprocessing then terminates the workers
# left with ONE SIGTERM (e.g. after an error line, the loader's iterator still referenced),
# which must end them; ignored, the exit waited for them forever.
_PARENT_EXITING = None  # a shared byte; in a worker, the parent's (see WorkerInit)


def _parent_exiting_flag():
    global _PARENT_EXITING
    if _PARENT_EXITING is None:
        import atexit
        import multiprocessing

        _PARENT_EXITING = multiprocessing.RawValue("b", 0)
        # registered after multiprocessing's own exit hook, so it runs before it (LIFO)
        atexit.register(_mark_exiting, _PARENT_EXITING)
    return _PARENT_EXITING


def _mark_exiting(flag) -> None:
    flag.value = 1


def _ignore_first_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if _PARENT_EXITING is not None and _PARENT_EXITING.value:
        os.kill(os.getpid(), signal.SIGTERM)  # the main process is exiting: so do we
    # else a group kill: the main process decides; the next SIGTERM ends this worker


class WorkerInit:
    """A DataLoader worker ignores its first SIGTERM: a group kill reaches the workers too,
    and a worker dying of it ends the main process in "DataLoader worker exited
    unexpectedly" before it can save anything. The main process decides; when it exits,
    multiprocessing terminates the workers left with a SIGTERM, which ends them (the
    parent's exit flag is set first; ignoring it hung that exit). `seed_rank`: Lightning's worker seeding
    (seed_everything(workers=True)), which it adds only to loaders without a
    worker_init_fn, is applied here then."""

    def __init__(self, inner=None, seed_rank: int | None = None) -> None:
        self.inner, self.seed_rank = inner, seed_rank
        self.parent_exiting = _parent_exiting_flag()  # shared with the workers it starts

    def __call__(self, worker_id: int) -> None:
        global _PARENT_EXITING
        _PARENT_EXITING = self.parent_exiting
        signal.signal(signal.SIGTERM, _ignore_first_sigterm)
        # forked with SIGTERM blocked (see _forked_with_sigterm_blocked): one that came
        # since is delivered now, to the handler above
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(-1)  # the parent's wakeup pipe is the parent's
        if self.inner is not None:
            self.inner(worker_id)
        elif self.seed_rank is not None:
            pl_worker_init_function(worker_id, rank=self.seed_rank)


def _forked_with_sigterm_blocked(get_iterator):
    """Between its fork and worker_init_fn a worker has torch's SIGTERM handler, which dies
    of a signal not sent by its parent: the workers are forked with SIGTERM blocked (the
    main process's other threads still take it), and WorkerInit unblocks it."""

    def wrapped():
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            return get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    return wrapped


def _with_worker_init(make_loader, trainer: L.Trainer):
    def wrapped(*args, **kwargs):
        loader = make_loader(*args, **kwargs)
        if getattr(loader, "num_workers", 0) > 0 and not isinstance(
            loader.worker_init_fn, WorkerInit
        ):
            seeded = int(os.environ.get("PL_SEED_WORKERS", 0)) != 0
            loader.worker_init_fn = WorkerInit(
                loader.worker_init_fn, trainer.global_rank if seeded else None
            )
            loader._get_iterator = _forked_with_sigterm_blocked(loader._get_iterator)
        return loader

    return wrapped


class SigtermGuard(L.Callback):
    """Installs the SIGTERM handler at once (the whole run, not only inside trainer calls).

    `metrics_path`: where rank 0's watchdog writes metrics.json; `checkpoint`: the
    last.ckpt a resume reads (named in that file when it exists).
    """

    def __init__(
        self,
        metrics_path: str | Path | None = None,
        checkpoint: str | Path | None = None,
        timeout_s: float | None = None,
        watchdog: bool | None = None,
    ) -> None:
        """`watchdog`: arm the watchdog on SIGTERM (None: only in the command-line process)."""
        self.metrics_path = Path(metrics_path) if metrics_path else None
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.timeout_s = float(timeout_s) if timeout_s else timeout_from_env()
        self.received_at: float | None = None  # time.time() of the first SIGTERM
        self._trainer: L.Trainer | None = None
        self._timer: threading.Timer | None = None
        self._lock = threading.RLock()
        self._wakeup_r: int | None = None
        self._wakeup_w: int | None = None
        self._previous: tuple | None = None  # (handler, wakeup fd) restored by close()
        self.watchdog = _COMMAND_LINE if watchdog is None else bool(watchdog)
        self._closed = False
        if threading.current_thread() is threading.main_thread():
            handler = signal.signal(signal.SIGTERM, self.handle)
            fd = None
            if self.watchdog:
                r, w = os.pipe()
                os.set_blocking(w, False)
                fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
                self._wakeup_r, self._wakeup_w = r, w
                threading.Thread(target=self._listen, name="sigterm-listener", daemon=True).start()
            self._previous = (handler, fd)
        if self.watchdog and _RECEIVED:  # came while the run was being built (a sweep's next job)
            self._note()

    def close(self) -> None:
        """The run is over (finished, or stopped and recorded): the watchdog disarmed and
        the SIGTERM handler and wakeup pipe put back, so that a process that goes on (a
        notebook, a test calling train()) is not ended `timeout_s` later. The command line
        bounds its own exit after an interruption (`exit_within`)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._closed = True
            if self._previous is not None and threading.current_thread() is threading.main_thread():
                handler, fd = self._previous
                if self.watchdog:  # the command line: noted until it exits (end_together)
                    handler = _note_after_run
                signal.signal(signal.SIGTERM, handler if handler is not None else signal.SIG_DFL)
                if fd is not None:
                    signal.set_wakeup_fd(fd)
                self._previous = None
                if self._wakeup_w is not None:
                    # the listener reads EOF and closes its end itself: closing it here would
                    # let a later file reuse the number under a thread still reading it
                    with contextlib.suppress(OSError):
                        os.close(self._wakeup_w)
                    self._wakeup_w = None

    # -- the handler: no collective, no exception ---------------------------------------
    def handle(self, signum, frame) -> None:
        if get_worker_info() is not None:
            return  # a DataLoader worker: the main process decides when to stop
        self._note(signum)

    def _note(self, signum: int = signal.SIGTERM) -> None:
        """The first SIGTERM: noted, forwarded to the ranks this process started, watchdog
        armed. Called by the handler and by the listener thread, whichever runs first."""
        with self._lock:
            if self.received_at is not None:
                return  # the same stop again (forwarded by rank 0, or the group kill)
            self.received_at = time.time()
            global _RECEIVED
            _RECEIVED = True
            if self.watchdog and not self._closed:
                self._timer = threading.Timer(self.timeout_s, self._expire)
                self._timer.daemon = True
                self._timer.start()
        log.info(f"received SIGTERM: {self._what_happens()}")
        launcher = getattr(getattr(self._trainer, "strategy", None), "launcher", None)
        if launcher is not None and hasattr(launcher, "kill"):
            launcher.kill(signum)  # the ranks this process started stop too

    def _what_happens(self) -> str:
        """What this signal does now, by where the run is (the final test cannot be cut
        once its last batch is in: the run then completes its record)."""
        from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus

        trainer = self._trainer
        state = getattr(trainer, "state", None)
        if self._closed or state is None:
            return "the run is over or not started; exiting with 143"
        running = state.status == TrainerStatus.RUNNING
        if state.fn == TrainerFn.TESTING:
            loop = getattr(trainer, "test_loop", None)
            last = bool(getattr(getattr(loop, "batch_progress", None), "is_last_batch", False))
            if not running or last:
                return (
                    "too late to stop the final test, which has ended: the run writes its "
                    "complete metrics.json, then exits with 143"
                )
            return (
                "stopping the final test at its next batch end: training is complete "
                "(last.ckpt), metrics.json will say interrupted, without test metrics"
            )
        if state.fn == TrainerFn.FITTING and running:
            return "stopping training at the next batch end (last.ckpt keeps the last epoch)"
        if state.fn == TrainerFn.FITTING:
            return (
                "training has ended: the final test stops at its next batch end (or completes "
                "if that is its last), then exit 143"
            )
        return "stopping this evaluation at its next batch end, then exit 143"

    def _listen(self) -> None:
        """Python runs a handler only when the main thread returns to bytecode: a main thread
        stuck in a collective never does. The C-level handler writes the signal number to
        the wakeup pipe at once; this thread reads it and arms the watchdog."""
        r = self._wakeup_r
        try:
            while data := os.read(r, 64):  # b"": close() closed the write end
                if signal.SIGTERM in data and not self._closed:
                    self._note()
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                os.close(r)

    # -- the shared decision ------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if not isinstance(trainer._signal_connector, _Connector):  # private, Lightning 2.x
            trainer._signal_connector = _Connector(trainer, self)
        dm = trainer.datamodule
        if dm is not None and not getattr(dm, "_sigterm_guarded", False):
            for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
                if hasattr(dm, name):
                    setattr(dm, name, _with_worker_init(getattr(dm, name), trainer))
            dm._sigterm_guarded = True

    def _sync(self, trainer: L.Trainer) -> None:
        if trainer.sanity_checking:
            return
        if distributed.any_rank(self.received_at is not None):
            trainer._signal_connector.received_sigterm = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *a) -> None:
        self._sync(trainer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *a) -> None:
        self._sync(trainer)

    # -- the watchdog -------------------------------------------------------------------
    def _expire(self) -> None:
        try:
            if distributed.is_global_zero():
                self._write_metrics()
                saved = (
                    f"resume with ckpt_path={self.checkpoint}"
                    if self.checkpoint and self.checkpoint.is_file()
                    else "no checkpoint was saved"
                )
                print(
                    f"interrupted: SIGTERM, and the run had not stopped {self.timeout_s:g} s "
                    f"later (a rank stopped answering): ended by the watchdog; {saved}",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            os._exit(SIGTERM_EXIT)

    def _write_metrics(self) -> None:
        path = self.metrics_path
        if path is None or self.received_at is None:
            return
        if path.is_file() and path.stat().st_mtime >= self.received_at:
            return  # the run wrote its own after the signal
        info = {
            "signal": "SIGTERM",
            "watchdog": f"the run had not stopped {self.timeout_s:g} s after SIGTERM",
        }
        if self.checkpoint and self.checkpoint.is_file():
            info["checkpoint"] = str(self.checkpoint)
        trainer = self._trainer
        if trainer is not None:
            info.update(epoch=trainer.current_epoch, global_step=trainer.global_step)
        write_record(path, {"status": str(Status.INTERRUPTED), "interrupted": info, "metrics": {}})


def exit_within(seconds: float) -> None:
    """After an interruption was recorded: the process ends with SIGTERM_EXIT at the latest
    `seconds` from now, whatever its shutdown waits for (a collective, a worker)."""
    timer = threading.Timer(seconds, os._exit, args=(SIGTERM_EXIT,))
    timer.daemon = True
    timer.start()
