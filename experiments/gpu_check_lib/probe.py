"""The measuring callback, run inside the `vpt_dml.run` child (`gpu_check.py --launch-run`):
what metrics.json does not record (GPU utilisation, the bank's copies, checkpoints,
k-means time, per-step losses). Imports torch and Lightning: the parent never imports it."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from .processes import REPO


def _nbytes(out) -> int:
    """Bytes of the tensors in `out` (a list of rows, or (rows, event))."""
    rows = out[0] if isinstance(out, tuple) else out
    return sum(r.numel() * r.element_size() for r in rows or () if torch.is_tensor(r))


class UtilSampler:
    """GPU utilisation samples while training (NVML via torch, else nvidia-smi)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.source: str | None = None
        self.reason: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> float:
        if self.source == "nvml":
            return float(torch.cuda.utilization())
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.split()
        idx = torch.cuda.current_device()
        return float(out[idx] if len(out) > idx else out[0])

    def start(self) -> None:
        for source in ("nvml", "nvidia-smi"):
            self.source = source
            try:
                self._read()
                break
            except Exception as err:  # noqa: BLE001 (any failure: try the next source)
                self.reason = f"{source}: {type(err).__name__}: {err}"
                self.source = None
        if self.source is None:
            return
        period = 0.1 if self.source == "nvml" else 0.5

        def loop() -> None:
            while not self._stop.wait(period):
                try:
                    self.samples.append(self._read())
                except Exception:  # noqa: BLE001
                    pass

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def report(self) -> dict:
        s = self.samples
        return {
            "source": self.source,
            "samples": len(s),
            "mean_pct": round(statistics.fmean(s), 1) if s else None,
            "median_pct": round(statistics.median(s), 1) if s else None,
            "unavailable": self.reason if self.source is None else None,
        }


class BankTimer:
    """Times the host class-prompt bank (vpt_dml/models/class_prompt_store.py) in place."""

    def __init__(self, store, probe) -> None:
        self.store, self.probe = store, probe
        self.host: dict[str, list[tuple[int, float]]] = {}
        self.copies: list[tuple[int, str, object, object, int]] = []
        self.copy_timing = None
        for name in ("prefetch", "gather", "step"):
            if callable(getattr(store, name, None)):
                setattr(store, name, self._host_timed(name, getattr(store, name)))
        cuda = torch.cuda.is_available()
        if cuda and callable(getattr(store, "_to_device", None)):
            store._to_device = self._h2d_timed(store._to_device)
            self.copy_timing = "cuda events"
        if cuda and callable(getattr(store, "_to_host", None)):
            store._to_host = self._d2h_timed(store._to_host)
        if not cuda:
            self.copy_timing = "none on CPU (copies are synchronous: inside the host times)"
        elif self.copy_timing is None:
            self.copy_timing = "unavailable: ClassPromptStore has no _to_device/_to_host"

    def _host_timed(self, name, fn):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            self.host.setdefault(name, []).append((self.probe.steps, time.perf_counter() - t))
            return out

        return timed

    def _event_timed(self, fn, kind, stream_of, nbytes_of):
        """CUDA events on `stream_of(args, kwargs)`'s stream around `fn`; never breaks
        the call (measuring must not change the run)."""

        def timed(*args, **kwargs):
            start = stream = None
            try:
                stream = stream_of(args, kwargs)
                if stream is not None:
                    start = torch.cuda.Event(enable_timing=True)
                    start.record(stream)
            except Exception:  # noqa: BLE001
                start = None
            out = fn(*args, **kwargs)
            if start is not None:
                try:
                    end = torch.cuda.Event(enable_timing=True)
                    end.record(stream)
                    nbytes = nbytes_of(args, kwargs, out)
                    self.copies.append((self.probe.steps, kind, start, end, nbytes))
                except Exception:  # noqa: BLE001
                    pass
            return out

        return timed

    def _h2d_timed(self, fn):
        """Events on the bank's copy stream around `_to_device`."""
        store = self.store

        def copy_stream(args, kwargs):
            device = next(
                (a for a in (*args, *kwargs.values()) if isinstance(a, torch.device)), None
            )
            if device is None or device.type != "cuda" or not hasattr(store, "_copy_stream"):
                return None
            if store._copy_stream is None:  # as _to_device would make it
                store._copy_stream = torch.cuda.Stream(device)
            # the copies wait for the compute stream: start timing after that
            store._copy_stream.wait_stream(torch.cuda.current_stream(device))
            return store._copy_stream

        return self._event_timed(fn, "h2d", copy_stream, lambda a, k, out: _nbytes(out))

    def _d2h_timed(self, fn):
        """Events on the compute stream around `_to_host` (its write-backs queue there)."""

        def rows_of(args, kwargs):
            return args[2] if len(args) > 2 else kwargs.get("rows")

        def compute_stream(args, kwargs):
            rows = rows_of(args, kwargs)
            if rows and torch.is_tensor(rows[0]) and rows[0].device.type == "cuda":
                return torch.cuda.current_stream(rows[0].device)
            return None

        return self._event_timed(
            fn, "d2h", compute_stream, lambda a, k, out: _nbytes(rows_of(a, k))
        )

    def report(self, warmup: int, timed_steps: int) -> dict:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        n = max(timed_steps, 1)
        host = {
            f"{name}_ms_per_step": round(1e3 * sum(s for k, s in rows if k >= warmup) / n, 3)
            for name, rows in self.host.items()
        }
        out = {"host": host, "copy_timing": self.copy_timing}
        for kind in ("h2d", "d2h"):
            rows = [c for c in self.copies if c[1] == kind and c[0] >= warmup]
            if rows:
                ms = sum(c[2].elapsed_time(c[3]) for c in rows)
                out[f"{kind}_ms_per_step"] = round(ms / n, 3)
                out[f"{kind}_mib_per_step"] = round(sum(c[4] for c in rows) / n / 2**20, 3)
                out[f"{kind}_gb_per_s"] = round(sum(c[4] for c in rows) / max(ms, 1e-9) / 1e6, 2)
        out["device_bytes_last_step"] = getattr(self.store, "last_device_bytes", None)
        return out


class Probe(Callback):
    """What one run's metrics.json does not record: per-step losses and host gaps, GPU
    utilisation while training, checkpoint writes (seconds, sizes), k-means seconds and
    images per evaluation, the host bank's copies. Images/s, evaluation and training
    seconds and peak memory are the run's own `cost` record (read by the parent); this
    callback leaves them alone (it never resets CUDA's peak memory statistics)."""

    def __init__(self, out: str, warmup: int) -> None:
        self.out = Path(out)
        self.warmup = warmup
        self.cuda = torch.cuda.is_available()
        self.steps = 0
        self.losses: list = []
        self.batch_sizes: list[int] = []
        self.gaps: list[float] = []
        self._last_end: float | None = None
        self.trained = False
        self.evals: list[dict] = []
        self.ckpts: list[dict] = []
        self._eval: dict | None = None
        self.util = UtilSampler()
        self.bank: BankTimer | None = None

    # -- helpers -----------------------------------------------------------------
    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def dump(self) -> None:
        timed_steps = self.steps - self.warmup
        data = {
            "device": torch.cuda.get_device_name() if self.cuda else "cpu",
            "torch": torch.__version__,
            "cuda": self.cuda,
            "steps": self.steps,
            "warmup": self.warmup,
            "batch_size": statistics.median(self.batch_sizes) if self.batch_sizes else None,
            "gap_ms_median": (round(1e3 * statistics.median(self.gaps), 3) if self.gaps else None),
            # host copies here, not per step: no sync inside the timed steps
            "losses": [float(x) if x is not None else float("nan") for x in self.losses],
            "gpu_util": self.util.report() if self.cuda else {"unavailable": "no GPU"},
            "evals": self.evals,
            "checkpoints": self.ckpts,
            "bank": (
                self.bank.report(self.warmup, timed_steps)
                if self.bank is not None and self.trained
                else None
            ),
        }
        self.out.write_text(json.dumps(data, indent=1) + "\n")

    def _time_clustering(self) -> None:
        """k-means (NMI/F1) timed apart: it grows as items x classes, not as items.
        Wraps `clustering_metrics` wherever a vpt_dml module imported it."""

        def timed(fn):
            def clustering_metrics(*args, **kwargs):
                self._sync()
                t = time.perf_counter()
                out = fn(*args, **kwargs)
                self._sync()
                if self._eval is not None:
                    self._eval["clustering_s"] += time.perf_counter() - t
                return out

            clustering_metrics._gpu_check = True
            return clustering_metrics

        for name, module in list(sys.modules.items()):
            if name.split(".")[0] != "vpt_dml" or name == "vpt_dml.evaluation.clustering":
                continue
            fn = getattr(module, "clustering_metrics", None)
            if callable(fn) and not getattr(fn, "_gpu_check", False):
                module.clustering_metrics = timed(fn)

    # -- checkpoints ---------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if getattr(trainer, "_gpu_check_timed", False):
            return
        self._time_clustering()
        save = trainer.save_checkpoint

        def timed_save(filepath, *args, **kwargs):
            self._sync()
            t = time.perf_counter()
            out = save(filepath, *args, **kwargs)
            self._sync()
            seconds = time.perf_counter() - t
            size = os.path.getsize(filepath) if os.path.exists(filepath) else 0
            entry = {"file": Path(filepath).name, "s": round(seconds, 3)}
            entry["gib"] = round(size / 2**30, 3)
            entry["epoch"] = trainer.current_epoch
            self.ckpts.append(entry)
            return out

        trainer.save_checkpoint = timed_save
        trainer._gpu_check_timed = True

    # -- training ----------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        store = getattr(pl_module, "class_prompt_store", None)
        if store is not None and self.bank is None:
            self.bank = BankTimer(store, self)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._last_end is not None:
            self.gaps.append(time.perf_counter() - self._last_end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.losses.append(loss.detach().float() if torch.is_tensor(loss) else None)
        self.batch_sizes.append(len(batch[1]))
        self.steps += 1
        if self.steps == max(self.warmup, 1) and self.cuda:
            self.util.start()
        self._last_end = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.cuda:
            self.util.stop()
        if self.steps < self.warmup:  # fewer steps than the warm-up: the bank's are all timed
            self.warmup = 0
        self.trained = True
        self.dump()

    # -- evaluation: which one runs (k-means seconds, images); its seconds are the record's
    def _eval_start(self, trainer, label: str) -> None:
        images = None
        try:
            loader = trainer.test_dataloaders if label == "test" else trainer.val_dataloaders
            images = len(loader.dataset)
        except Exception:  # noqa: BLE001 (a count is a nicety)
            pass
        self._eval = {"label": label, "images": images, "clustering_s": 0.0}

    def _eval_end(self) -> None:
        if self._eval is None:
            return
        e, self._eval = self._eval, None
        e["clustering_s"] = round(e["clustering_s"], 3)
        self.evals.append(e)
        self.dump()

    def on_validation_start(self, trainer, pl_module) -> None:
        fn = getattr(getattr(trainer.state, "fn", None), "value", "")
        self._eval_start(trainer, "before" if fn == "validate" else "val")

    def on_validation_end(self, trainer, pl_module) -> None:
        self._eval_end()

    def on_test_start(self, trainer, pl_module) -> None:
        self._eval_start(trainer, "test")

    def on_test_end(self, trainer, pl_module) -> None:
        self._eval_end()

    def on_exception(self, trainer, pl_module, exception) -> None:
        try:
            self.dump()  # what was measured up to the crash (the losses above all)
        except Exception:  # noqa: BLE001 (a broken CUDA context: the log tells)
            pass


def launch_run(probe_path: str, warmup: int, overrides: list[str]) -> None:
    """In the subprocess: `python -m vpt_dml.run OVERRIDES` with the Probe on its Trainer."""
    import runpy

    import lightning.pytorch as pl

    probe = Probe(probe_path, warmup)
    init = pl.Trainer.__init__

    def init_with_probe(self, *args, **kwargs):
        callbacks = list(kwargs.pop("callbacks", None) or [])
        init(self, *args, callbacks=[*callbacks, probe], **kwargs)

    pl.Trainer.__init__ = init_with_probe
    sys.argv = [str(REPO / "vpt_dml" / "run.py"), *overrides]
    runpy.run_module("vpt_dml.run", run_name="__main__", alter_sys=True)
