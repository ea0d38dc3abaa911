"""What a run costs: training images/s, seconds per epoch and per evaluation, peak memory.

Logged every training epoch as cost/... through the Lightning loggers, summarised by
`summary()` for metrics.json. Times are wall-clock on rank 0 (time.perf_counter):

- a training epoch runs from its start to the end of its last batch; validation, which
  Lightning runs inside the epoch after the last batch, is not part of it;
- images/s = images / seconds over the training steps after the first `warmup_steps` of
  this process (compilation, cuDNN autotuning, allocator growth); the window restarts at
  each epoch start, so the data loaders' start-up is counted. Images are the global batch
  (per-rank batch x world size). Too short a run for the warm-up: all steps are counted;
  `warmup_steps_excluded` says which;
- an evaluation runs from the validation (test) loop's start to its end;
- peak memory: torch.cuda.max_memory_allocated on a GPU, the process's peak RSS on CPU
  (rank 0's process; both since the process started).

The accumulators travel in checkpoints: a resumed run sums over all of its sessions.
"""

from __future__ import annotations

import resource
import sys
import time

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(MiB, what was measured)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process peak RSS"


def trainable_parameters(pl_module: L.LightningModule) -> int:
    """The module's own count when it keeps parameters outside itself (host class-prompt
    store), else the trainable tensors' elements."""
    summary = getattr(pl_module, "parameter_summary", None) or {}
    counted = (summary.get("all") or {}).get("trainable")
    if counted is not None:
        return int(counted)
    return sum(p.numel() for p in pl_module.parameters() if p.requires_grad)


class CostMonitor(L.Callback):
    def __init__(self, warmup_steps: int = 10) -> None:
        self.warmup_steps = int(warmup_steps)
        # run totals (kept in checkpoints)
        self.total = {
            "epochs": 0,
            "train_s": 0.0,  # all training steps' windows
            "train_images": 0,
            "timed_s": 0.0,  # windows after warm-up
            "timed_images": 0,
            "eval_s": 0.0,
            "evaluations": 0,
        }
        self.other_evals: dict[str, float] = {}  # before / test: seconds
        self._session_steps = 0
        self._restoring = False
        self._epoch: dict = {}
        self._eval_start: float | None = None
        self._peak = (0.0, "")

    # -- training ----------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = time.perf_counter()
        self._epoch = {
            "start": now,
            "last_end": now,
            "images": 0,
            "timed_from": now if self._session_steps >= self.warmup_steps else None,
            "timed_images": 0,
            "eval_s": 0.0,
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._epoch:  # resumed mid-epoch: no epoch start came first
            self.on_train_epoch_start(trainer, pl_module)
        now = time.perf_counter()
        images = len(batch[0]) * trainer.world_size
        e = self._epoch
        e["last_end"] = now
        e["images"] += images
        if e["timed_from"] is not None:
            e["timed_images"] += images
        self._session_steps += 1
        if e["timed_from"] is None and self._session_steps >= self.warmup_steps:
            e["timed_from"] = now  # the next step is the first one counted

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        e = self._epoch
        if not e:
            return
        train_s = e["last_end"] - e["start"]
        timed_s = e["last_end"] - e["timed_from"] if e["timed_from"] is not None else 0.0
        t = self.total
        t["epochs"] += 1
        t["train_s"] += train_s
        t["train_images"] += e["images"]
        t["timed_s"] += timed_s
        t["timed_images"] += e["timed_images"]
        self._peak = peak_memory(pl_module.device)
        logged = {
            "cost/train_epoch_s": train_s,
            "cost/train_images": float(e["images"]),
            "cost/peak_memory_mib": self._peak[0],
            "cost/trainable_params": float(trainable_parameters(pl_module)),
        }
        if e["timed_images"] and timed_s > 0:
            logged["cost/train_images_per_s"] = e["timed_images"] / timed_s
        if e["eval_s"]:
            logged["cost/eval_s"] = e["eval_s"]
        pl_module.log_dict(logged, on_step=False, on_epoch=True, rank_zero_only=True)
        self._epoch = {}

    # -- evaluation --------------------------------------------------------------------
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._eval_start is None or trainer.sanity_checking:
            return
        seconds = time.perf_counter() - self._eval_start
        self._eval_start = None
        if trainer.state.fn == TrainerFn.FITTING:
            self.total["eval_s"] += seconds
            self.total["evaluations"] += 1
            if self._epoch:
                self._epoch["eval_s"] += seconds
        else:
            label = getattr(pl_module, "eval_label", None) or "validate"
            self.other_evals[f"{label}_eval_s"] = seconds

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start = time.perf_counter()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._eval_start is not None:
            self.other_evals["test_eval_s"] = time.perf_counter() - self._eval_start
            self._eval_start = None

    # -- result ------------------------------------------------------------------------
    def summary(self, pl_module: L.LightningModule) -> dict:
        t = self.total
        timed = t["timed_images"] > 0 and t["timed_s"] > 0
        images, seconds = (
            (t["timed_images"], t["timed_s"]) if timed else (t["train_images"], t["train_s"])
        )
        mib, kind = peak_memory(pl_module.device)
        out = {
            "train_images_per_s": images / seconds if seconds > 0 else None,
            "warmup_steps_excluded": self.warmup_steps if timed else 0,
            "train_epoch_s": t["train_s"] / t["epochs"] if t["epochs"] else None,
            "train_epochs_timed": t["epochs"],
            "train_images": t["train_images"],
            "train_s": t["train_s"],
            "eval_s": t["eval_s"] / t["evaluations"] if t["evaluations"] else None,
            "evaluations_during_training": t["evaluations"],
            **self.other_evals,
            "peak_memory_mib": mib,
            "peak_memory_kind": kind,
            "trainable_params": trainable_parameters(pl_module),
        }
        return out

    # -- checkpoint --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"total": dict(self.total)}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # test(ckpt_path=best) restores callbacks too: only a resumed fit takes the totals
        self._restoring = trainer.state.fn == TrainerFn.FITTING

    def load_state_dict(self, state_dict: dict) -> None:
        if self._restoring:
            self.total.update(state_dict.get("total", {}))
        self._restoring = False
