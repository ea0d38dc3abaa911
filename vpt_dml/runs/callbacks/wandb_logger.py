"""`logger=wandb`: a W&B logger that can never stop training.

Any failure (wandb not installed, init refused, a network error while logging) logs a
warning; the run continues with the other loggers (the CSV logger is always kept).
`WANDB_MODE=offline` works without an account; runs are synced later with `wandb sync`.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger("vpt_dml")


class SafeWandbLogger(WandbLogger):
    """WandbLogger whose logging calls warn instead of raising."""

    _failed = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Lightning passes anonymous=None to wandb.init, which wandb >= 0.19 answers with a
        # deprecation warning on every run: a setting left unset is not passed at all
        if getattr(self, "_wandb_init", {}).get("anonymous", False) is None:
            del self._wandb_init["anonymous"]

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        if self._failed:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # W&B must never end a training run
            self._failed = True
            log.warning(
                "W&B %s failed (%s: %s); W&B logging is off for this run", what, type(e).__name__, e
            )

    def log_metrics(self, metrics, step=None) -> None:
        self._guard("log_metrics", super().log_metrics, metrics, step)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        self._guard("log_hyperparams", super().log_hyperparams, params, *args, **kwargs)

    def log_image(self, key: str, images: list, **kwargs) -> None:
        self._guard("log_image", super().log_image, key, images, **kwargs)

    def log_table(self, key: str, **kwargs) -> None:
        self._guard("log_table", super().log_table, key, **kwargs)

    def finalize(self, status: str) -> None:
        self._guard("finalize", super().finalize, status)


def wandb_logger(**kwargs: Any) -> SafeWandbLogger | None:
    """The logger, or None (with a warning) when W&B cannot start."""
    try:
        import wandb  # noqa: F401  (the extra may be missing)

        logger = SafeWandbLogger(**kwargs)
        if rank_zero_only.rank == 0:
            _ = logger.experiment  # wandb.init happens here: fail now, not mid-training
        return logger
    except Exception as e:
        log.warning(
            "W&B could not start (%s: %s); continuing with the CSV logger", type(e).__name__, e
        )
        return None


def finish_wandb() -> None:
    """Close the current W&B run, so the next job of a sweep opens its own."""
    try:
        import wandb
    except ImportError:
        return
    try:
        if wandb.run is not None:
            wandb.finish()
    except Exception as e:
        log.warning("wandb.finish failed (%s: %s)", type(e).__name__, e)
