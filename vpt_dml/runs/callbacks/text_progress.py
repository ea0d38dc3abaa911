"""Progress and results as plain lines, for logs that are files.

A rich progress bar draws nothing useful into a file (SLURM, nohup, `make demo > log`).
`progress_callback` is the one place that chooses what a run shows:

- stdout is a terminal: Lightning's rich bar, and the lines below go to run.log only;
- stdout is not a terminal: the lines below, to the console and to run.log;
- trainer.enable_progress_bar=false: the lines to run.log only.

The lines: every `every_n_steps` training steps and at each epoch's end (epoch, step, loss,
images/s, ETA), and one per evaluation with its metrics. They go through the "vpt_dml"
logger, which Hydra's job logging writes to the console and to <run dir>/run.log. Epochs
are shown as index/last index from 0, as Lightning's bar, metrics.csv and the checkpoint
names count them. Rank zero only.
"""

from __future__ import annotations

import io
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar, RichProgressBar

log = logging.getLogger("vpt_dml")


# -- where a line goes -----------------------------------------------------------------
def _file_handlers() -> list[logging.Handler]:
    """The log files the root logger writes (Hydra's run.log), console handlers left out."""
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def to_run_log(text: str) -> None:
    """Write `text` (one or more lines) to the run's log file only, not the console."""
    for handler in _file_handlers():
        record = log.makeRecord(log.name, logging.INFO, __file__, 0, text, None, None)
        if record.levelno >= handler.level:
            handler.handle(record)


def to_console_and_run_log(text: str) -> None:
    if log.hasHandlers():  # Hydra's job logging (console + run.log) or the user's own
        log.info(text)
    else:  # a Trainer outside Hydra with logging unconfigured: INFO would vanish
        print(text, flush=True)


def plain_text(renderable: Any, width: int = 100) -> str:
    """A rich renderable (e.g. the summary Table) as plain text, no colours or escapes."""
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(renderable)
    return buf.getvalue().rstrip("\n")


def table_to_run_log(table: Any) -> None:
    """The final summary table into run.log (the console already shows it)."""
    to_run_log(plain_text(table))


# -- the lines -------------------------------------------------------------------------
def format_duration(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_metrics(metrics: Mapping[str, Any], prefix: str) -> str:
    parts = []
    for key, value in metrics.items():  # in the order the module logged them
        value = float(value.item() if torch.is_tensor(value) else value)
        parts.append(f"{key.removeprefix(prefix)} {value:.4f}")
    return " | ".join(parts)


def _batch_size(batch: Any) -> int:
    """Images in this rank's batch: the first tensor's leading dimension."""
    if torch.is_tensor(batch):
        return int(batch.shape[0])
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, Mapping) and batch:
        return _batch_size(next(iter(batch.values())))
    return 0


def _loss(outputs: Any) -> float | None:
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    return float(loss.detach().float().item()) if torch.is_tensor(loss) else None


def _epoch_loss(trainer: L.Trainer) -> float | None:
    for key, value in trainer.callback_metrics.items():
        if key.endswith("loss_epoch") and key.startswith("train"):
            return float(value)
    return None


class _Lines:
    """The hooks that write the lines; mixed into a progress bar or a plain callback."""

    def _setup_lines(self, every_n_steps: int, emit: Callable[[str], None]) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be at least 1")
        self.every_n_steps = every_n_steps
        self._emit = emit

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._fit_start = time.perf_counter()
        self._start_step = trainer.global_step
        self._start_window()  # a run resumed mid-epoch gets no epoch start

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._start_window()

    def _start_window(self) -> None:
        now = time.perf_counter()
        self._epoch_start = self._window_start = self._last_batch_end = now
        self._epoch_images = self._window_images = 0

    def _epoch_label(self, trainer: L.Trainer) -> str:
        # Lightning's own bar's convention: epoch index / last epoch index
        last = trainer.max_epochs
        return f"epoch {trainer.current_epoch}" + (f"/{last - 1}" if last and last > 0 else "")

    def _eta(self, trainer: L.Trainer) -> str:
        done = trainer.global_step - self._start_step
        total = trainer.estimated_stepping_batches
        if done <= 0 or not total or total == float("inf"):
            return "?"
        elapsed = time.perf_counter() - self._fit_start  # evaluations included, in proportion
        return format_duration(elapsed / done * max(total - trainer.global_step, 0))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        images = _batch_size(batch) * trainer.world_size
        self._epoch_images += images
        self._window_images += images
        now = self._last_batch_end = time.perf_counter()
        if not trainer.is_global_zero or (batch_idx + 1) % self.every_n_steps:
            return
        rate = self._window_images / max(now - self._window_start, 1e-9)
        self._window_start, self._window_images = now, 0
        loss = _loss(outputs)
        self._emit(
            f"{self._epoch_label(trainer)} step {batch_idx + 1}/{trainer.num_training_batches} "
            f"(global {trainer.global_step}) | loss {'?' if loss is None else f'{loss:.4f}'} | "
            f"{rate:.1f} img/s | ETA {self._eta(trainer)}"
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        # the epoch's evaluation ran before this hook: images/s counts the training steps only
        train_s = self._last_batch_end - self._epoch_start
        total_s = time.perf_counter() - self._epoch_start
        loss = _epoch_loss(trainer)
        self._emit(
            f"{self._epoch_label(trainer)} done (global step {trainer.global_step}) | "
            f"loss {'?' if loss is None else f'{loss:.4f}'} (epoch mean) | "
            f"{self._epoch_images / max(train_s, 1e-9):.1f} img/s | "
            f"train {format_duration(train_s)}, with eval {format_duration(total_s)} | "
            f"ETA {self._eta(trainer)}"
        )

    def _evaluation(self, trainer: L.Trainer, label: str) -> None:
        if not trainer.is_global_zero:
            return
        prefix = f"{label}/"
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}
        if not metrics:
            return
        when = "" if label == "test" else f" (epoch {trainer.current_epoch})"
        self._emit(f"eval {label}{when}: {format_metrics(metrics, prefix)}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not trainer.sanity_checking:
            self._evaluation(trainer, getattr(pl_module, "eval_label", None) or "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_test_end(trainer, pl_module)
        self._evaluation(trainer, "test")


class TextProgressBar(_Lines, ProgressBar):
    """The progress bar for files: plain lines to the console and run.log."""

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        self._setup_lines(every_n_steps, to_console_and_run_log)
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False
        self._emit = to_run_log

    def enable(self) -> None:
        self._enabled = True
        self._emit = to_console_and_run_log


class RichProgressBarWithRunLog(_Lines, RichProgressBar):
    """Lightning's rich bar in a terminal; the plain lines still go to run.log."""

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        self._setup_lines(every_n_steps, to_run_log)


class RunLogLines(_Lines, Callback):
    """No progress bar (trainer.enable_progress_bar=false): the lines go to run.log only."""

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        self._setup_lines(every_n_steps, to_run_log)


def progress_callback(
    every_n_steps: int = 50, enabled: bool = True, stream: Any = None
) -> Callback:
    """The run's progress display, chosen by whether `stream` (stdout) is a terminal."""
    if not enabled:
        return RunLogLines(every_n_steps)
    stream = sys.stdout if stream is None else stream
    is_terminal = bool(getattr(stream, "isatty", lambda: False)())
    return (
        RichProgressBarWithRunLog(every_n_steps) if is_terminal else TextProgressBar(every_n_steps)
    )
