"""The run's CSV history (`csv/metrics.csv`), appended to when a run resumes in its folder."""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing metrics.csv (Lightning's writer empties it) and its columns."""

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            header = next(csv.reader(f), [])
        # new rows go under the old header; a new column rewrites the file with all columns
        self.metrics_keys = list(header)


class AppendingCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a resumed run appends to the run's CSV history."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
