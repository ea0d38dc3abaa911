"""Progress for logs that are files: plain lines to the console and to Hydra's run.log."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar
from rich.table import Table
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import bare_trainer
from vpt_dml.runs.callbacks.text_progress import (
    RichProgressBarWithRunLog,
    RunLogLines,
    TextProgressBar,
    plain_text,
    progress_callback,
    to_run_log,
)


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_progress_is_chosen_by_whether_stdout_is_a_terminal() -> None:
    terminal = progress_callback(10, enabled=True, stream=_Stream(True))
    assert isinstance(terminal, RichProgressBarWithRunLog) and isinstance(terminal, RichProgressBar)
    assert type(progress_callback(10, enabled=True, stream=_Stream(False))) is TextProgressBar
    assert type(progress_callback(10, enabled=False, stream=_Stream(False))) is RunLogLines


@pytest.fixture
def root_handlers(tmp_path: Path):
    """A console handler and a file handler on the root logger, as Hydra's job logging sets."""
    console_buf = io.StringIO()
    console = logging.StreamHandler(console_buf)
    file = logging.FileHandler(tmp_path / "run.log")
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(console)
    root.addHandler(file)
    yield console_buf, tmp_path / "run.log"
    root.removeHandler(console)
    root.removeHandler(file)
    file.close()
    root.setLevel(old_level)


def test_run_log_only_lines_skip_the_console(root_handlers) -> None:
    console, run_log = root_handlers
    table = Table(title="summary")
    table.add_column("metric")
    table.add_column("value")
    table.add_row("recall@1", "61.25")
    text = plain_text(table)
    assert "recall@1" in text and "61.25" in text and "\x1b[" not in text
    to_run_log(text)
    assert "61.25" in run_log.read_text() and console.getvalue() == ""


class _Tiny(L.LightningModule):
    """Enough of a metric-learning module to log a loss and evaluation metrics."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self) -> None:
        self.log("val/recall@1", 0.25 + 0.5 * self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lines_have_step_epoch_loss_speed_eta_and_metrics(root_handlers, tmp_path: Path) -> None:
    console, run_log = root_handlers
    data = DataLoader(TensorDataset(torch.randn(24, 4)), batch_size=4)  # 6 steps an epoch
    # the progress bar is the callback under test: enable_progress_bar stays on
    trainer = bare_trainer(
        tmp_path,
        max_epochs=2,
        enable_progress_bar=True,
        callbacks=[TextProgressBar(every_n_steps=3)],
    )
    trainer.fit(_Tiny(), data, data)
    text = console.getvalue()
    assert text == run_log.read_text()  # one stream of lines, to both
    steps = re.findall(
        r"epoch (\d)/1 step (\d)/6 \(global (\d+)\) \| loss [\d.]+ \| [\d.]+ img/s \| ETA \d:\d\d:\d\d",
        text,
    )
    assert steps == [("0", "3", "3"), ("0", "6", "6"), ("1", "3", "9"), ("1", "6", "12")]
    epochs = re.findall(
        r"epoch (\d)/1 done \(global step \d+\) \| loss ([\d.]+) \(epoch mean\)", text
    )
    assert [e for e, _ in epochs] == ["0", "1"]
    assert re.findall(r"eval val \(epoch (\d)\): recall@1 ([\d.]+)", text) == [
        ("0", "0.2500"),
        ("1", "0.7500"),
    ]
