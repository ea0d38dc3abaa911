"""A callback that only sleeps after each training step: a job that would otherwise finish
before Slurm's time-limit signal arrives (on a quiet machine 150 tiny epochs take ~30 s) is
still training when the signal comes. Sleeping draws no random numbers and changes no
tensor, so the job's metrics still equal an unslowed straight run's. Only the job's first
start sleeps: once Slurm has requeued it (SLURM_RESTART_COUNT > 0) it trains at full speed.
"""

from __future__ import annotations

import os
import time

from lightning.pytorch import Callback


class SleepAfterEachStep(Callback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if int(os.environ.get("SLURM_RESTART_COUNT") or 0) == 0:
            time.sleep(self.seconds)
