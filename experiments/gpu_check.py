"""GPU check: the paper presets end to end on one GPU, with real-size JPEGs, in one command.

    python experiments/gpu_check.py                   # GPU: sop_deep + cub_deep, then the benches
    python experiments/gpu_check.py --cpu --tiny      # the same code paths on CPU in about a minute

What it does:
0. a smoke phase first (about 2 minutes on a GPU, `--smoke-budget-s`): sop_deep and
   cub_deep on small copies at the real image sizes - the evaluation before training, 2
   short epochs (10 batches each), the test; a resume from last.ckpt to a third epoch; then
   export, embed and retrieve of 50 test images (each must find itself first). Every CUDA
   path the measured runs take runs here a few steps. If anything fails, the script stops
   with its `GPU CHECK FAILED:` lines and the measured runs never start, so a broken path
   costs two minutes of GPU time, not eight: fix it on CPU (`--cpu --tiny --smoke-only`),
   then use the rest of the time for a second call. `--smoke-only` stops after it,
   `--skip-smoke` leaves it out;
1. writes real-size JPEG copies of the official layouts into a temporary folder, with a
   process per CPU core: SOP (Ebay_train.txt / Ebay_test.txt, 11,318 training classes x 2
   images, 2,000 test classes x 5, 400x400) and CUB-200-2011 (images.txt,
   image_class_labels.txt, images/NNN.Name/*.jpg, 200 classes x 30, 500x375). The pixels
   are cheap blocky patterns (one per class, jittered per image), but every file is a real
   JPEG of that size, so decoding and resizing cost what they cost on the real datasets;
2. runs `vpt_dml.run` on `+experiment=sop_deep` and `+experiment=cub_deep` with random
   backbone weights, `data.strict_counts=false`, a bounded number of training steps
   (`--steps`, default 300: SOP's fake epoch is longer, so it stops after 300 batches of
   its first epoch; CUB's is 46 batches, so it runs 7 whole epochs), the evaluation before training and the test after it, and everything
   else as the preset sets it (precision, class-prompt bank, workers, batch sizes, eval
   cadence). Each run is `python -m vpt_dml.run` in a subprocess (runpy, exactly what `-m`
   does) with one extra Lightning callback that measures it (`Probe`, below);
3. fails loudly - a `GPU CHECK FAILED:` line per problem, exit status 1 - on a crash,
   a non-finite loss (the probe's per-step losses and csv/metrics.csv) or a metric outside
   [0, 1] (metrics.json, old flat layout or the newer final/best/before keys, and the csv);
4. prints per preset: training images/s after warm-up (data loading, bank and logging
   included; evaluations and checkpoint writes excluded), GPU utilisation (NVML through
   torch.cuda.utilization, else nvidia-smi, sampled while training), peak GPU memory
   (training / evaluation), evaluation seconds, the class-prompt bank's transfer time per
   step (CUDA events on the bank's side stream from each host->device request - staging
   into pinned memory included - to its rows on the device, and on the compute stream
   around each device->host write-back; plus the host time spent inside the bank's
   prefetch / gather / step), checkpoint seconds and sizes, and the
   projected wall time of the full preset on the real dataset sizes of METHOD.md §4:
   epochs x (images // batch x batch) / images/s, plus every evaluation the preset's
   cadence asks for (eval.start_epoch / eval.every_n_epochs from the run's
   config_resolved.yaml, defaults 0 / 1, and the final epoch; without them Lightning's
   check_val_every_n_epoch), the before/test evaluations scaled by test images (k-means
   of the test by images x classes), checkpoints per epoch and start-up;
   then runs experiments/bench_train_step.py (batch 64, and batch 32 / k 1 as sop_deep)
   and experiments/bench_eval.py on the device. The last line is one JSON object.

`--cpu --tiny`: a tiny ViT (tests/conftest.py's, 12 blocks deep), 32 px images, a few dozen
classes, 4 steps, one DataLoader worker, fp32; the presets' batch sizes, bank and
cadence are kept. bench_eval.py runs at 2,000 items; bench_train_step.py is skipped
(it has no image-size / depth flags: its smallest model is a 224 px ViT-Ti, minutes for
its 9 variants on 2 shared cores). tests/test_gpu_check.py runs this mode.

Running it on the GPU machine (`run` tool of this workplace; nothing there can be
fetched, and it has torch, timm, lightning but not hydra-core, omegaconf or
antlr4-python3-runtime, which travel as wheels in the git-ignored .whl/):

  here, once, in the repository root (or `make gpu-check-wheels`, if the Makefile has it):
    rm -rf .whl && mkdir .whl
    .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 -d .whl \
        hydra-core==1.3.8 omegaconf==2.3.1
    .venv/bin/python -m pip wheel --no-deps antlr4-python3-runtime==4.9.3 -w .whl
  (antlr4 4.9.3 ships only an sdist; `pip wheel` builds the pure-python wheel. The other
  dependencies in pyproject.toml - torchmetrics, rich, scipy, safetensors, matplotlib,
  pillow, numpy, timm, lightning - are on the GPU image; faiss-cpu is optional (k-means
  falls back to torch on the GPU) and the package itself goes on PYTHONPATH.)

  then run `pytest -m slow tests/test_gpu_check.py` here, and make one call with the
  wheels carried. It takes up to ~11 of the 15 device minutes (a minute or two to start
  the machine, at most 480 s of script, the transfers), so there is no room for a
  second full call: call give_back right after it.
    run(carry=[".whl"], timeout_s=540, command=
      "set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile "
      "--no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3; "
      "export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 WANDB_MODE=disabled "
      "PYTHONUNBUFFERED=1; nvidia-smi --query-gpu=name,memory.total,driver_version "
      "--format=csv; python3 experiments/gpu_check.py --out $OUT --budget-s 480 2>&1 "
      "| tee $OUT/gpu_check.log")
  $OUT brings back gpu_check.log, gpu_check.json and the runs' and benches' logs (7 files);
  copy them into experiments/results/ (the issue asks for the full output there).
  --budget-s bounds the whole script: the benches are skipped (with the reason in the
  JSON) when too little of it is left after the two presets.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESETS = ("sop_deep", "cub_deep")
PRESET_RESERVE_S = 100  # budget kept for each preset still to run

# METHOD.md §4: official split sizes (train images, test images, test classes).
REAL_SIZES = {
    "sop": {"train_images": 59551, "test_images": 60502, "test_classes": 11316},
    "cub": {"train_images": 5864, "test_images": 5924, "test_classes": 100},
    "cars": {"train_images": 8054, "test_images": 8131, "test_classes": 98},
    "inshop": {"train_images": 25882, "test_images": 14218 + 12612, "test_classes": 3985},
    "inat": {"train_images": 325846, "test_images": 136093, "test_classes": 2452},
}

# The tiny ViT of tests/conftest.py, 12 blocks deep so the presets' prompt depths stay valid.
_TINY_BACKBONE = [
    "model.backbone.name=vit_tiny_patch16_224",
    "model.backbone.pretrained=false",
    "model.backbone.weights=null",
    "++model.backbone.synthetic_pretraining=null",
    "++model.backbone.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 12, num_heads: 2}",
    "model.embed_dim=16",
]

METRIC_NAME = re.compile(
    r"^(recall@\d+|precision@\d+|map@r\w*|r_precision\w*|nmi|f1)(_before)?$", re.IGNORECASE
)


# --------------------------------------------------------------------------------------
# 1. dataset copies
# --------------------------------------------------------------------------------------
@dataclass
class Layout:
    """What one fake copy holds (for the run's steps and the projection's scaling)."""

    dataset: str
    root: Path
    train_classes: int
    train_images: int
    test_classes: int
    test_images: int
    image_size: tuple[int, int]  # (width, height)


def _pixels(class_seed: int, image_seed: int, width: int, height: int):
    """A blocky pattern per class, jittered per image: cheap to make, a real JPEG to decode."""
    import numpy as np

    block = max(2, min(width, height) // 16)
    shape = (height // block + 1, width // block + 1, 3)
    base = np.random.default_rng(class_seed).integers(0, 256, shape)
    jitter = np.random.default_rng(image_seed).integers(-48, 49, shape)
    small = np.clip(base + jitter, 0, 255).astype(np.uint8)
    return small.repeat(block, 0).repeat(block, 1)[:height, :width]


def _write_chunk(tasks: list[tuple[str, int, int, int, int]]) -> int:
    from PIL import Image

    for path, class_seed, image_seed, width, height in tasks:
        Image.fromarray(_pixels(class_seed, image_seed, width, height)).save(
            path, "JPEG", quality=90
        )
    return len(tasks)


def _write_all(tasks: list[tuple[str, int, int, int, int]], processes: int) -> None:
    for folder in {os.path.dirname(t[0]) for t in tasks}:
        os.makedirs(folder, exist_ok=True)
    chunks = [tasks[i : i + 256] for i in range(0, len(tasks), 256)]
    with Pool(processes) as pool:
        written = sum(pool.imap_unordered(_write_chunk, chunks))
    if written != len(tasks):
        raise RuntimeError(f"wrote {written} of {len(tasks)} images")


SOP_SUPER = ["bicycle", "cabinet", "chair", "coffee_maker", "fan", "kettle", "lamp", "mug"]
SOP_SUPER += ["sofa", "stapler", "table", "toaster"]


def write_sop(
    root: Path, train_classes: int, train_per: int, test_classes: int, test_per: int, size, procs
) -> Layout:
    """Stanford_Online_Products/Ebay_{train,test}.txt ("image_id class_id super_class_id path")."""
    base = root / "Stanford_Online_Products"
    tasks, image_id = [], 0
    parts = (
        ("Ebay_train.txt", 1, train_classes, train_per),
        ("Ebay_test.txt", train_classes + 1, test_classes, test_per),
    )
    for file, first, n, per in parts:
        lines = ["image_id class_id super_class_id path"]
        for c in range(first, first + n):
            sup = (c - 1) % len(SOP_SUPER)
            for j in range(per):
                image_id += 1
                rel = f"{SOP_SUPER[sup]}_final/{100000 + c}_{j}.JPG"
                lines.append(f"{image_id} {c} {sup + 1} {rel}")
                tasks.append((str(base / rel), c, 10**7 + image_id, *size))
        base.mkdir(parents=True, exist_ok=True)
        (base / file).write_text("\n".join(lines) + "\n")
    _write_all(tasks, procs)
    return Layout(
        "sop",
        root,
        train_classes,
        train_classes * train_per,
        test_classes,
        test_classes * test_per,
        size,
    )


def write_cub(root: Path, classes: int, per_class: int, size, procs) -> Layout:
    """CUB_200_2011/images.txt, image_class_labels.txt, classes.txt, images/NNN.Name/*.jpg."""
    base = root / "CUB_200_2011"
    images, labels, names, tasks = [], [], [], []
    for c in range(1, classes + 1):
        folder = f"{c:03d}.Bird_{c}"
        names.append(f"{c} {folder}")
        for j in range(per_class):
            i = len(images) + 1
            rel = f"{folder}/Bird_{c}_{j:04d}.jpg"
            images.append(f"{i} {rel}")
            labels.append(f"{i} {c}")
            tasks.append((str(base / "images" / rel), 20000 + c, 2 * 10**7 + i, *size))
    base.mkdir(parents=True, exist_ok=True)
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "classes.txt").write_text("\n".join(names) + "\n")
    _write_all(tasks, procs)
    train = classes // 2  # the loader trains on the first half of the classes
    return Layout(
        "cub",
        root,
        train,
        train * per_class,
        classes - train,
        (classes - train) * per_class,
        size,
    )


def write_layouts(data_dir: Path, tiny: bool, procs: int) -> dict[str, Layout]:
    if tiny:  # enough classes for the presets' own batches (SOP 32 x 1, CUB 32 x 2)
        sop = write_sop(data_dir / "sop", 64, 2, 20, 5, (32, 32), procs)
        cub = write_cub(data_dir / "cub", 64, 4, (32, 24), procs)
    else:
        sop = write_sop(data_dir / "sop", 11318, 2, 2000, 5, (400, 400), procs)
        cub = write_cub(data_dir / "cub", 200, 30, (500, 375), procs)
    return {"sop": sop, "cub": cub}


# --------------------------------------------------------------------------------------
# 2. the measuring callback (runs inside the vpt_dml.run subprocess)
# --------------------------------------------------------------------------------------
def _probe_class():
    """Defined lazily: the parent process never imports torch or lightning."""
    import threading

    import torch
    from lightning.pytorch.callbacks import Callback

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
                    out[f"{kind}_gb_per_s"] = round(
                        sum(c[4] for c in rows) / max(ms, 1e-9) / 1e6, 2
                    )
            out["device_bytes_last_step"] = getattr(self.store, "last_device_bytes", None)
            return out

    class Probe(Callback):
        """Measures one run: throughput after warm-up, losses, evals, checkpoints, bank."""

        def __init__(self, out: str, warmup: int) -> None:
            self.out = Path(out)
            self.warmup = warmup
            self.cuda = torch.cuda.is_available()
            self.steps = 0
            self.losses: list = []
            self.batch_sizes: list[int] = []
            self.gaps: list[float] = []
            self._last_end: float | None = None
            self.t_first = self.t0 = self.t_end = None
            self.excluded_loop = 0.0  # eval + checkpoint seconds after the first step
            self.excluded_window = 0.0  # ... after warm-up
            self.evals: list[dict] = []
            self.ckpts: list[dict] = []
            self._eval: dict | None = None
            self.util = UtilSampler()
            self.bank: BankTimer | None = None
            self.memory = {"train_gib": 0.0, "eval_gib": 0.0, "reserved_gib": 0.0}

        # -- helpers -----------------------------------------------------------------
        def _sync(self) -> None:
            if self.cuda:
                torch.cuda.synchronize()

        def _exclude(self, seconds: float) -> None:
            if self.t_first is not None and self.t_end is None:
                self.excluded_loop += seconds
            if self.t0 is not None and self.t_end is None:
                self.excluded_window += seconds

        def _peaks(self) -> tuple[float, float]:
            if not self.cuda:
                return 0.0, 0.0
            return (
                torch.cuda.max_memory_allocated() / 2**30,
                torch.cuda.max_memory_reserved() / 2**30,
            )

        def _reset_peaks(self) -> None:
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()

        def dump(self) -> None:
            timed_steps = self.steps - self.warmup
            window = None
            if self.t0 is not None and self.t_end is not None:
                window = self.t_end - self.t0 - self.excluded_window
            images = sum(self.batch_sizes[self.warmup :])
            data = {
                "device": torch.cuda.get_device_name() if self.cuda else "cpu",
                "torch": torch.__version__,
                "cuda": self.cuda,
                "steps": self.steps,
                "warmup": self.warmup,
                "batch_size": statistics.median(self.batch_sizes) if self.batch_sizes else None,
                "images_timed": images,
                "timed_s": window,
                "images_per_s": images / window if window and images else None,
                "train_loop_s": (
                    self.t_end - self.t_first - self.excluded_loop
                    if self.t_first is not None and self.t_end is not None
                    else None
                ),
                "gap_ms_median": (
                    round(1e3 * statistics.median(self.gaps), 3) if self.gaps else None
                ),
                # host copies here, not per step: no sync inside the timed steps
                "losses": [float(x) if x is not None else float("nan") for x in self.losses],
                "gpu_util": self.util.report() if self.cuda else {"unavailable": "no GPU"},
                "memory_gib": (
                    {k: round(v, 3) for k, v in self.memory.items()} if self.cuda else None
                ),
                "evals": self.evals,
                "checkpoints": self.ckpts,
                "bank": (
                    self.bank.report(self.warmup, timed_steps)
                    if self.bank is not None and self.t_end is not None
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
                if self._eval is not None:  # ModelCheckpoint saves inside on_validation_end
                    self._eval["ckpt_s"] += seconds
                else:
                    self._exclude(seconds)
                return out

            trainer.save_checkpoint = timed_save
            trainer._gpu_check_timed = True

        # -- training ----------------------------------------------------------------
        def on_train_start(self, trainer, pl_module) -> None:
            self._reset_peaks()
            store = getattr(pl_module, "class_prompt_store", None)
            if store is not None and self.bank is None:
                self.bank = BankTimer(store, self)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            now = time.perf_counter()
            if self.t_first is None:
                self.t_first = now
            if self._last_end is not None:
                self.gaps.append(now - self._last_end)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            self.losses.append(loss.detach().float() if torch.is_tensor(loss) else None)
            self.batch_sizes.append(len(batch[1]))
            self.steps += 1
            if self.steps == self.warmup:
                self._sync()
                self.t0 = time.perf_counter()
                if self.cuda:
                    self.util.start()
            self._last_end = time.perf_counter()

        def on_train_end(self, trainer, pl_module) -> None:
            self._sync()
            self.t_end = time.perf_counter()
            if self.cuda:
                self.util.stop()
            if self.t0 is None:  # fewer steps than the warm-up: time them all
                self.t0, self.warmup = self.t_first, 0
            alloc, reserved = self._peaks()
            self.memory["train_gib"] = max(self.memory["train_gib"], alloc)
            self.memory["reserved_gib"] = max(self.memory["reserved_gib"], reserved)
            self.dump()

        # -- evaluation --------------------------------------------------------------
        def _eval_start(self, trainer, label: str) -> None:
            self._sync()
            if label == "val":  # training peak so far, before the eval's own
                alloc, reserved = self._peaks()
                self.memory["train_gib"] = max(self.memory["train_gib"], alloc)
                self.memory["reserved_gib"] = max(self.memory["reserved_gib"], reserved)
            self._reset_peaks()
            images = None
            try:
                loader = trainer.test_dataloaders if label == "test" else trainer.val_dataloaders
                images = len(loader.dataset)
            except Exception:  # noqa: BLE001 (a count is a nicety)
                pass
            self._eval = {"label": label, "t": time.perf_counter(), "images": images}
            self._eval.update(ckpt_s=0.0, clustering_s=0.0)

        def _eval_end(self) -> None:
            if self._eval is None:
                return
            self._sync()
            e, self._eval = self._eval, None
            raw = time.perf_counter() - e.pop("t")
            self._exclude(raw)
            e["s"] = round(raw - e["ckpt_s"], 3)
            e["ckpt_s"] = round(e["ckpt_s"], 3)
            e["clustering_s"] = round(e["clustering_s"], 3)
            alloc, reserved = self._peaks()
            e["peak_gib"] = round(alloc, 3) if self.cuda else None
            self.memory["eval_gib"] = max(self.memory["eval_gib"], alloc)
            self.memory["reserved_gib"] = max(self.memory["reserved_gib"], reserved)
            self._reset_peaks()
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

    return Probe


def launch_run(probe_path: str, warmup: int, overrides: list[str]) -> None:
    """In the subprocess: `python -m vpt_dml.run OVERRIDES` with the Probe on its Trainer."""
    import runpy

    import lightning.pytorch as pl

    probe = _probe_class()(probe_path, warmup)
    init = pl.Trainer.__init__

    def init_with_probe(self, *args, **kwargs):
        callbacks = list(kwargs.pop("callbacks", None) or [])
        init(self, *args, callbacks=[*callbacks, probe], **kwargs)

    pl.Trainer.__init__ = init_with_probe
    sys.argv = [str(REPO / "vpt_dml" / "run.py"), *overrides]
    runpy.run_module("vpt_dml.run", run_name="__main__", alter_sys=True)


# --------------------------------------------------------------------------------------
# 3. checks
# --------------------------------------------------------------------------------------
def metric_leaves(obj, path: str = "") -> list[tuple[str, object]]:
    """(dotted path, value) of every metric-named leaf in metrics.json (any layout)."""
    out = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            sub = f"{path}.{key}" if path else str(key)
            if isinstance(value, (dict, list)):
                out += metric_leaves(value, sub)
            elif METRIC_NAME.match(str(key).rsplit("/", 1)[-1]):
                out.append((sub, value))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            out += metric_leaves(value, f"{path}[{i}]")
    return out


def _bad_metric(value) -> bool:
    if value is None:
        return False  # e.g. best_epoch before any validation
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    return not (math.isfinite(value) and 0.0 <= value <= 1.0)


def check_metrics_json(result: dict) -> list[str]:
    leaves = metric_leaves({k: v for k, v in result.items() if k not in ("cost", "provenance")})
    problems = [f"metrics.json {p} = {v!r} is not in [0, 1]" for p, v in leaves if _bad_metric(v)]
    if not any(p.rsplit(".", 1)[-1].rsplit("/", 1)[-1] == "recall@1" for p, _ in leaves):
        problems.append("metrics.json holds no recall@1")
    return problems


def check_csv(path: Path) -> list[str]:
    """csv/metrics.csv: every loss finite, every metric column in [0, 1]."""
    if not path.is_file():
        return [f"{path} is missing"]
    problems = []
    with path.open() as f:
        for row_no, row in enumerate(csv.DictReader(f), 2):
            for key, cell in row.items():
                if cell in (None, "") or key is None:
                    continue
                name = key.rsplit("/", 1)[-1]
                is_loss = "loss" in name
                if not (is_loss or METRIC_NAME.match(name)):
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    problems.append(f"{path.name} line {row_no}: {key}={cell!r} is not a number")
                    continue
                if is_loss and not math.isfinite(value):
                    problems.append(f"{path.name} line {row_no}: {key}={cell} is not finite")
                elif not is_loss and _bad_metric(value):
                    problems.append(f"{path.name} line {row_no}: {key}={cell} is not in [0, 1]")
    return problems


def check_losses(losses: list[float]) -> list[str]:
    if not losses:
        return ["no training loss was recorded"]
    bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    if bad:
        return [f"non-finite training loss at {len(bad)} step(s), first at step {bad[0]}"]
    return []


# --------------------------------------------------------------------------------------
# 4. projection to the real dataset sizes
# --------------------------------------------------------------------------------------
def validated_epochs(epochs: int, eval_cfg: dict, trainer_cfg: dict) -> int:
    """Epochs the preset validates during fit: with eval.start_epoch / eval.every_n_epochs,
    epoch e (0-based) when e >= start and (e - start) % every == 0, and the final epoch
    always (callbacks/eval_schedule.py); without them Lightning's check_val_every_n_epoch."""
    if "start_epoch" in eval_cfg or "every_n_epochs" in eval_cfg:
        start = int(eval_cfg.get("start_epoch") or 0)
        every = max(int(eval_cfg.get("every_n_epochs") or 1), 1)
        return sum(
            1 for e in range(epochs) if e == epochs - 1 or (e >= start and (e - start) % every == 0)
        )
    every = max(int(trainer_cfg.get("check_val_every_n_epoch") or 1), 1)
    return sum(1 for e in range(epochs) if (e + 1) % every == 0)


def project(cfg: dict, probe: dict, layout: Layout, run_wall_s: float) -> dict:
    """Wall time of the full preset on the real dataset, from this run's measurements."""
    trainer_cfg, data_cfg = cfg.get("trainer") or {}, cfg.get("data") or {}
    eval_cfg = cfg.get("eval") or {}
    real = REAL_SIZES[layout.dataset]
    epochs = int(trainer_cfg.get("max_epochs") or 1)
    batch = int(data_cfg.get("batch_size") or probe.get("batch_size") or 1)
    ips = probe.get("images_per_s")
    images_per_epoch = real["train_images"] // batch * batch
    train_s = epochs * images_per_epoch / ips if ips else None

    evals = probe.get("evals") or []
    plain = [e for e in evals if e["label"] in ("before", "val") and e.get("images")]
    per_image = (
        statistics.median((e["s"] - e.get("clustering_s", 0.0)) / e["images"] for e in plain)
        if plain
        else None
    )
    tests = [e for e in evals if e["label"] == "test" and e.get("images")]
    n_val = validated_epochs(epochs, eval_cfg, trainer_cfg)
    before = 1 if cfg.get("eval_before_training", True) else 0
    eval_s = clustering_real = None
    if per_image is not None:
        one_eval = per_image * real["test_images"]
        test = tests[-1] if tests else {"s": 0.0, "images": 0}
        clustering = test.get("clustering_s", 0.0)
        # what the test adds beyond embedding + retrieval metrics, besides k-means (the
        # dashboard's figures): taken as constant
        rest = max(test["s"] - per_image * test["images"] - clustering, 0.0)
        # k-means: seeding and Lloyd steps grow with items x classes (an upper bound)
        growth = (real["test_images"] * real["test_classes"]) / max(
            layout.test_images * layout.test_classes, 1
        )
        clusterings = 1 + (n_val if eval_cfg.get("clustering_every_epoch") else 0)
        clustering_real = clusterings * clustering * growth
        eval_s = (before + n_val + 1) * one_eval + clustering_real + rest

    lasts = [c["s"] for c in probe.get("checkpoints") or [] if c["file"].startswith("last")]
    bests = [c["s"] for c in probe.get("checkpoints") or [] if not c["file"].startswith("last")]
    ckpt_s = epochs * (statistics.fmean(lasts) if lasts else 0.0) + n_val * (
        statistics.fmean(bests) if bests else 0.0
    )
    accounted = (
        (probe.get("train_loop_s") or 0.0)
        + sum(e["s"] + e.get("ckpt_s", 0.0) for e in evals)
        + sum(c["s"] for c in probe.get("checkpoints") or [])
    )
    startup_s = max(run_wall_s - accounted, 0.0)
    total = None if train_s is None or eval_s is None else train_s + eval_s + ckpt_s + startup_s
    return {
        "dataset": layout.dataset,
        "epochs": epochs,
        "batch_size": batch,
        "train_images_per_epoch": images_per_epoch,
        "test_images": real["test_images"],
        "validated_epochs": n_val,
        "evaluations": before + n_val + 1,
        "train_h": _hours(train_s),
        "eval_h": _hours(eval_s),
        "kmeans_h": _hours(clustering_real),
        "checkpoint_h": _hours(ckpt_s),
        "startup_h": _hours(startup_s),
        "hours": _hours(total),
        "note": "training at the measured images/s; evaluations scaled by test images, k-means "
        "by test images x classes (an upper bound); a best checkpoint at every validated epoch",
    }


def _hours(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds / 3600, 4)


# --------------------------------------------------------------------------------------
# 5. smoke phase: every CUDA path a few steps each, before any measured run
# --------------------------------------------------------------------------------------
SMOKE_IMAGES = 50  # images embedded and searched by export -> embed -> retrieve
SMOKE_TOP_K = 5


def write_smoke_layouts(data_dir: Path, tiny: bool, procs: int) -> dict[str, Layout]:
    """Small copies at the real image sizes: 10 batches an epoch of each preset's batch
    (SOP 32 x k=1, CUB 64), and test splits of a few hundred images, so a whole smoke run
    (evaluation before, 2 epochs, test, resume, test) takes seconds on a GPU."""
    if tiny:
        return write_layouts(data_dir, tiny=True, procs=procs)
    return {
        "sop": write_sop(data_dir / "sop", 160, 2, 40, 5, (400, 400), procs),
        "cub": write_cub(data_dir / "cub", 64, 20, (500, 375), procs),
    }


def smoke_overrides(name: str, layout: Layout, run_dir: Path, args) -> list[str]:
    out = [
        f"+experiment={name}",
        f"data.root={layout.root}",
        "data.strict_counts=false",
        "model.backbone.pretrained=false",
        "model.backbone.weights=null",
        f"hydra.run.dir={run_dir}",
        "trainer.enable_progress_bar=false",
        f"trainer.limit_train_batches={2 if args.tiny else 10}",
        "trainer.max_epochs=2",
    ]
    if args.tiny:
        out += tiny_backbone() + ["data.num_workers=1"]
    if args.cpu:
        out += ["trainer.accelerator=cpu", "trainer.precision=32-true"]
    return out + list(args.override)


def smoke_step(label: str, cmd: list[str], work: Path, args, deadline: float) -> tuple[dict, list]:
    """One command of the smoke phase, logged to work/smoke_<label>.log."""
    log_path = work / f"smoke_{label}.log"
    t = time.perf_counter()
    rc = run_logged(cmd, log_path, args.cpu, deadline - time.monotonic())
    step = {"rc": rc, "wall_s": round(time.perf_counter() - t, 1), "log": str(log_path)}
    failures = []
    if rc != 0:
        last = tail(log_path).strip().splitlines()
        failures.append(
            f"smoke {label}: exited with {rc}: {last[-1] if last else '(no output)'}\n"
            f"last lines of {log_path}:\n{tail(log_path)}"
        )
    return step, failures


def check_smoke_run(label: str, run_dir: Path, epochs: int) -> tuple[dict, list[str]]:
    """metrics.json finished, metrics in [0, 1], finite losses, the last epoch evaluated."""
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        return {}, [f"smoke {label}: {metrics_path} is missing"]
    result = json.loads(metrics_path.read_text())
    problems = [f"smoke {label}: {p}" for p in check_metrics_json(result)]
    problems += [f"smoke {label}: {p}" for p in check_csv(run_dir / "csv" / "metrics.csv")]
    if result.get("status") != "finished":
        problems.append(f"smoke {label}: metrics.json status is {result.get('status')!r}")
    final = result.get("final") or {}
    if final.get("epoch") != epochs - 1:
        problems.append(
            f"smoke {label}: the final evaluation is of epoch {final.get('epoch')}, "
            f"expected {epochs - 1}"
        )
    seen = {
        "status": result.get("status"),
        "final_epoch": final.get("epoch"),
        "recall@1": (result.get("metrics") or {}).get("recall@1"),
        "recall@1_before": (result.get("metrics") or {}).get("recall@1_before"),
        "warnings": result.get("warnings") or [],
    }
    return seen, problems


def smoke_serving(name: str, layout: Layout, run_dir: Path, work: Path, args, deadline) -> tuple:
    """export -> embed SMOKE_IMAGES test images -> retrieve them: each query's own image
    comes back first with cosine ~1 (it is in the gallery)."""
    from vpt_dml.data.registry import load_splits

    splits, _ = load_splits(layout.dataset, str(layout.root))
    images = work / f"smoke_{name}_images"
    images.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(splits.test.paths[:SMOKE_IMAGES]):
        link = images / f"{i:03d}{Path(path).suffix}"
        if not link.exists():
            link.symlink_to(path)
    py, steps, failures = sys.executable, {}, []
    weights = work / f"smoke_{name}.safetensors"
    emb = work / f"smoke_{name}_embed"
    found = work / f"smoke_{name}_retrieval.json"
    device = ["--device", "cpu" if args.cpu else "cuda"]
    plan = [
        ("export", [py, "-m", "vpt_dml.export", str(run_dir), str(weights)]),
        ("embed", [py, "-m", "vpt_dml.embed", str(weights), str(images), str(emb), *device]),
        (
            "retrieve",
            [py, "-m", "vpt_dml.retrieve", str(weights), str(images), str(emb)]
            + ["--top-k", str(SMOKE_TOP_K), "--out", str(found), *device],
        ),
    ]
    for label, cmd in plan:
        steps[label], problems = smoke_step(f"{name}_{label}", cmd, work, args, deadline)
        failures += problems
        if problems:
            return steps, failures
    meta = json.loads((emb / "embed.json").read_text())
    if meta.get("count") != SMOKE_IMAGES:
        failures.append(f"smoke {name} embed: {meta.get('count')} embeddings, not {SMOKE_IMAGES}")
    failures += [f"smoke {name} retrieve: {p}" for p in check_self_retrieval(found)]
    return steps, failures


def check_self_retrieval(path: Path) -> list[str]:
    """Every query's first neighbour is its own file, with cosine >= 0.999."""
    rows = json.loads(path.read_text())
    queries = rows if isinstance(rows, list) else rows.get("queries") or []
    if len(queries) != SMOKE_IMAGES:
        return [f"{len(queries)} queries answered, not {SMOKE_IMAGES}"]
    problems = []
    for q in queries:
        hits = q.get("neighbours") or q.get("results") or []
        if len(hits) != SMOKE_TOP_K:
            problems.append(f"{q.get('query')}: {len(hits)} neighbours, not {SMOKE_TOP_K}")
            continue
        first = hits[0]
        same = Path(str(first.get("path"))).name == Path(str(q.get("query"))).name
        score = first.get("similarity", first.get("score", 0.0))
        if not same or float(score) < 0.999:
            problems.append(f"{q.get('query')}: first neighbour {first}, not itself")
    return problems[:5]


def smoke_phase(args, work: Path, procs: int) -> dict:
    """sop_deep and cub_deep: evaluation before, 2 short epochs, test; a resume to a third
    epoch from last.ckpt; export, embed and retrieve of SMOKE_IMAGES images. Every CUDA path
    the measured runs take (the presets' precision, host bank, workers, device evaluation
    and k-means, fused AdamW, checkpoints) runs here first, in about two minutes."""
    deadline = time.monotonic() + (args.smoke_budget_s or (600.0 if args.tiny else 150.0))
    out: dict = {"presets": {}, "failures": []}
    t = time.perf_counter()
    layouts = write_smoke_layouts(work / "smoke_data", args.tiny, procs)
    out["data_write_s"] = round(time.perf_counter() - t, 1)
    py = sys.executable
    for name in args.presets:
        layout = layouts.get(name.split("_")[0])
        if layout is None:
            out["failures"].append(f"smoke {name}: no fake layout for this preset")
            continue
        run_dir = work / "smoke_runs" / name
        base = smoke_overrides(name, layout, run_dir, args)
        r: dict = {"steps": {}}
        cmd = [py, "-m", "vpt_dml.run", *base]
        r["steps"]["train"], failures = smoke_step(f"{name}_train", cmd, work, args, deadline)
        if not failures:
            r["train"], failures = check_smoke_run(f"{name} train", run_dir, 2)
        if not failures:
            ckpt = run_dir / "checkpoints" / "last.ckpt"
            # a resume may change the epoch count, nothing else (vpt_dml.run refuses more)
            resume = [o for o in base if not o.startswith("trainer.max_epochs=")]
            cmd = [py, "-m", "vpt_dml.run", *resume, "trainer.max_epochs=3", f"ckpt_path={ckpt}"]
            r["steps"]["resume"], failures = smoke_step(f"{name}_resume", cmd, work, args, deadline)
            if not failures:
                r["resume"], failures = check_smoke_run(f"{name} resume", run_dir, 3)
        if not failures:
            serving, failures = smoke_serving(name, layout, run_dir, work, args, deadline)
            r["steps"].update(serving)
        out["failures"] += failures
        out["presets"][name] = r
        print(
            f"[smoke {name}] "
            + ", ".join(f"{k} rc={v['rc']} {v['wall_s']} s" for k, v in r["steps"].items())
            + (" FAILED" if failures else " ok"),
            flush=True,
        )
    out["wall_s"] = round(time.perf_counter() - t, 1)
    return out


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------
def tiny_backbone() -> list[str]:
    return list(_TINY_BACKBONE)


def preset_batch_size(overrides: list[str]) -> int:
    """data.batch_size of the run as Hydra composes it (to size the bounded run)."""
    try:
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[o for o in overrides if not o.startswith("hydra.")])
        GlobalHydra.instance().clear()
        return int(cfg.data.batch_size)
    except Exception as err:  # noqa: BLE001 (the run itself will report a bad config)
        print(f"could not compose the config ({type(err).__name__}: {err}); batch size from yaml")
    return _yaml_batch_size(overrides)


def _yaml_batch_size(overrides: list[str]) -> int:
    """Fallback: the experiment's data.batch_size, else its data option's batch_size."""
    import yaml

    name = next(o.split("=", 1)[1] for o in overrides if o.startswith("+experiment="))
    node = yaml.safe_load((REPO / "conf" / "experiment" / f"{name}.yaml").read_text()) or {}
    if (node.get("data") or {}).get("batch_size"):
        return int(node["data"]["batch_size"])
    for entry in node.get("defaults") or []:
        if isinstance(entry, dict) and "override /data" in entry:
            data = REPO / "conf" / "data" / f"{entry['override /data']}.yaml"
            return int((yaml.safe_load(data.read_text()) or {}).get("batch_size") or 32)
    return 32


def child_env(cpu: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_preset(name: str, layout: Layout, work: Path, args, deadline: float) -> dict:
    overrides = [
        f"+experiment={name}",
        f"data.root={layout.root}",
        "data.strict_counts=false",
        "model.backbone.pretrained=false",
        "model.backbone.weights=null",
        f"hydra.run.dir={work / 'runs' / name}",
        "trainer.enable_progress_bar=false",
    ]
    settings = (tiny_backbone() + ["data.num_workers=1"]) if args.tiny else []
    if args.cpu:
        settings += ["trainer.accelerator=cpu", "trainer.precision=32-true"]
    settings += args.override
    batch = preset_batch_size(overrides + settings)
    epoch_len = max(layout.train_images // batch, 1)
    if args.steps <= epoch_len:  # stop inside the first epoch, at an epoch end
        steps = args.steps
        overrides += [f"trainer.limit_train_batches={steps}", f"trainer.max_steps={steps}"]
    else:  # whole epochs
        steps = math.ceil(args.steps / epoch_len) * epoch_len
        overrides.append(f"trainer.max_steps={steps}")
    overrides += settings
    warmup = args.warmup if args.warmup is not None else max(1, min(30, steps // 10))
    run_dir = work / "runs" / name
    probe_path = work / f"{name}_probe.json"
    log_path = work / f"{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--launch-run", str(probe_path)]
    cmd += [str(warmup), *overrides]
    out = {"overrides": overrides, "steps": steps, "warmup": warmup, "failures": []}
    print(f"[{name}] {steps} steps (batch {batch}), warm-up {warmup}: {' '.join(overrides)}")
    t = time.perf_counter()
    rc = run_logged(cmd, log_path, args.cpu, deadline - time.monotonic())
    out["run_wall_s"] = round(time.perf_counter() - t, 2)
    out["rc"] = rc
    out["log"] = str(log_path)
    if rc != 0:
        last = tail(log_path).strip().splitlines()
        out["failures"].append(
            f"{name}: vpt_dml.run exited with {rc}: {last[-1] if last else '(no output)'}\n"
            f"last lines of {log_path}:\n{tail(log_path)}"
        )

    probe = json.loads(probe_path.read_text()) if probe_path.is_file() else None
    if probe is None:
        out["failures"].append(
            f"{name}: the run recorded no measurements (crashed before training)"
        )
    else:
        out["failures"] += [f"{name}: {p}" for p in check_losses(probe["losses"])]
        warnings = []
        if not any(e["label"] == "before" for e in probe["evals"]):
            warnings.append(f"{name}: no evaluation before training ran")
        if rc == 0 and probe["steps"] != steps:
            warnings.append(f"{name}: {probe['steps']} training steps ran, {steps} were asked for")
        if warnings:
            out["warnings"] = warnings
    metrics_path = run_dir / "metrics.json"
    result = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    if result is None:
        if rc == 0:
            out["failures"].append(f"{name}: {metrics_path} is missing")
    else:
        out["failures"] += [f"{name}: {p}" for p in check_metrics_json(result)]
        out["metrics"] = result.get("metrics")
        for key in ("final", "best", "before", "cost"):
            if key in result:
                out[key] = result[key]
    if rc == 0:
        out["failures"] += [f"{name}: {p}" for p in check_csv(run_dir / "csv" / "metrics.csv")]

    cfg_path = run_dir / "config_resolved.yaml"
    if probe is not None and cfg_path.is_file():
        import yaml

        cfg = yaml.safe_load(cfg_path.read_text())
        model = cfg.get("model") or {}
        out["as_run"] = {
            "precision": (cfg.get("trainer") or {}).get("precision"),
            "batch_size": (cfg.get("data") or {}).get("batch_size"),
            "samples_per_class": (cfg.get("data") or {}).get("samples_per_class"),
            "num_workers": (cfg.get("data") or {}).get("num_workers"),
            "fast_decode": (cfg.get("data") or {}).get("fast_decode"),
            "class_prompt_store": (model.get("proxy") or {}).get("class_prompt_store"),
            "eval": cfg.get("eval"),
            "max_epochs": (cfg.get("trainer") or {}).get("max_epochs"),
        }
        out["projection"] = project(cfg, probe, layout, out["run_wall_s"])
    if probe is not None:
        losses = probe["losses"]
        out.update(
            device=probe["device"],
            train_images_per_s=_round(probe["images_per_s"], 1),
            timed_steps=probe["steps"] - probe["warmup"],
            gap_ms_median=probe["gap_ms_median"],
            loss_first=losses[0] if losses else None,
            loss_last=losses[-1] if losses else None,
            loss_finite=not check_losses(losses),
            gpu_util=probe["gpu_util"],
            memory_gib=probe["memory_gib"],
            evals=probe["evals"],
            checkpoints=probe["checkpoints"],
            bank=probe["bank"],
        )
    return out


def _round(x, n):
    return None if x is None else round(x, n)


def describe(name: str, r: dict) -> str:
    util = r.get("gpu_util") or {}
    mem = r.get("memory_gib") or {}
    ev = ", ".join(
        f"{e['label']} {e['s']:.1f} s ({e.get('images')} images)" for e in r.get("evals") or []
    )
    bank = r.get("bank")
    if bank:
        host = sum(v for v in bank["host"].values())
        bank_s = (
            f"bank copies H2D {bank.get('h2d_ms_per_step', '-')} ms/step "
            f"({bank.get('h2d_mib_per_step', '-')} MiB), D2H {bank.get('d2h_ms_per_step', '-')} "
            f"ms/step, host time in the bank {host:.2f} ms/step"
        )
    else:
        bank_s = "no host bank"
    ck = sum(c["s"] for c in r.get("checkpoints") or [])
    p = r.get("projection") or {}
    lines = [
        f"[{name}] {r.get('device')}: {r.get('train_images_per_s')} training images/s over "
        f"{r.get('timed_steps')} steps after {r.get('warmup')} warm-up; host gap between "
        f"steps {r.get('gap_ms_median')} ms (median)",
        f"[{name}] GPU utilisation {util.get('median_pct')}% median / {util.get('mean_pct')}% mean "
        f"({util.get('samples')} samples, {util.get('source') or util.get('unavailable')}); peak "
        f"GPU memory train {mem.get('train_gib')} GiB, eval {mem.get('eval_gib')} GiB, "
        f"reserved {mem.get('reserved_gib')} GiB",
        f"[{name}] evaluations: {ev or 'none'}; checkpoints {ck:.1f} s; {bank_s}",
        f"[{name}] loss {r.get('loss_first')} -> {r.get('loss_last')}; metrics {r.get('metrics')}",
        f"[{name}] projected full preset on real {p.get('dataset')}: {p.get('epochs')} epochs x "
        f"{p.get('train_images_per_epoch')} images = {p.get('train_h')} h training + "
        f"{p.get('evaluations')} evaluations {p.get('eval_h')} h + checkpoints "
        f"{p.get('checkpoint_h')} h + start-up {p.get('startup_h')} h = {p.get('hours')} h",
    ]
    return "\n".join(lines)


def run_logged(cmd: list[str], log_path: Path, cpu: bool, timeout: float) -> int | str:
    """`cmd` in the repo with its output in `log_path`: the exit code, or "timeout"."""
    try:
        with log_path.open("w") as log:
            return subprocess.run(
                cmd,
                cwd=REPO,
                env=child_env(cpu),
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=max(timeout, 1),
            ).returncode
    except subprocess.TimeoutExpired:
        return "timeout"


def run_bench(label: str, cmd: list[str], work: Path, cpu: bool, timeout: float) -> dict:
    log_path = work / f"{label}.log"
    print(f"[{label}] {' '.join(cmd[1:])}")
    t = time.perf_counter()
    rc = run_logged(cmd, log_path, cpu, timeout)
    out = {"cmd": " ".join(cmd[1:]), "rc": rc, "wall_s": round(time.perf_counter() - t, 1)}
    out["log"] = str(log_path)
    lines = log_path.read_text(errors="replace").strip().splitlines() if log_path.is_file() else []
    try:
        out["result"] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        out["result"] = None
    if rc != 0 or out["result"] is None:
        out["failure"] = f"{label}: exited with {rc}; last lines:\n{tail(log_path)}"
    return out


def benches(args, work: Path, deadline: float) -> dict:
    py, exp = sys.executable, REPO / "experiments"
    if args.skip_bench:
        return {"skipped": "--skip-bench"}
    if args.cpu:
        plan = [
            (
                "bench_eval",
                [py, str(exp / "bench_eval.py"), "--device", "cpu", "--n", "2000"]
                + ["--classes", "400", "--dim", "32", "--skip-pml"],
                60,
            )
        ]
        skipped = {
            "bench_train_step": "skipped on CPU: it has no image-size or depth flags, and its "
            "smallest model (ViT-Ti at 224 px, 9 variants) takes minutes on 2 shared cores"
        }
    else:
        # order: the step-time target (batch 64), sop_deep's batch, then retrieval
        plan = [
            ("bench_train_step", [py, str(exp / "bench_train_step.py"), "--device", "cuda"], 90),
            (
                "bench_train_step_b32",
                [py, str(exp / "bench_train_step.py"), "--device", "cuda", "--quick"]
                + ["--batch", "32", "--k", "1"],
                60,
            ),
            ("bench_eval", [py, str(exp / "bench_eval.py"), "--device", "cuda", "--skip-pml"], 40),
        ]
        skipped = {}
    out = {label: {"skipped": reason} for label, reason in skipped.items()}
    for label, cmd, needs in plan:
        left = deadline - time.monotonic()
        if left < needs:
            out[label] = {"skipped": f"{left:.0f} s of the budget left, it needs about {needs} s"}
            continue
        out[label] = run_bench(label, cmd, work, args.cpu, left)
    return out


def describe_bench(label: str, b: dict) -> str:
    if "skipped" in b:
        return f"[{label}] skipped: {b['skipped']}"
    res = b.get("result") or {}
    if "variants" in res:
        v = res["variants"]
        rows = ", ".join(
            f"{k} {v[k]['images_per_s']} img/s ({v[k]['time_vs_full_ft']}x full FT time)"
            for k in ("full_ft", "vptsp_g")
            if k in v
        )
        return f"[{label}] {res.get('model')} batch {res.get('batch')}: {rows}"
    if "ours_s" in res:
        return f"[{label}] {res.get('n')} x {res.get('dim')}: {res['ours_s']} s, peak {res.get('ours_peak_gb')} GB"
    return f"[{label}] rc {b.get('rc')}, no result"


def sop_vs_bench(presets: dict, bench: dict) -> dict | None:
    """The issue's target: sop_deep's end-to-end images/s vs the bench's step at batch 32."""
    sop = presets.get("sop_deep") or {}
    b = ((bench.get("bench_train_step_b32") or {}).get("result") or {}).get("variants") or {}
    ips, step_ips = sop.get("train_images_per_s"), (b.get("vptsp_g") or {}).get("images_per_s")
    if not ips or not step_ips:
        return None
    return {
        "sop_deep_images_per_s": ips,
        "bench_vptsp_g_images_per_s_b32": step_ips,
        "ratio": round(ips / step_ips, 3),
        "note": "the bench step uses CUB ViT-S prompt counts (P=10, Q=3 on 12 layers), 100 "
        "classes, dense class prompts and random tensors; sop_deep uses P=90 step 5, Q=5 on "
        "8 layers and the host bank, fed by the DataLoader: indicative, not the same step",
    }


class StopAfterSmoke(Exception):
    """The smoke phase failed (or --smoke-only): the measured runs are not started."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on CPU (CUDA hidden from the runs)")
    ap.add_argument("--tiny", action="store_true", help="tiny ViT, 32 px images, a few classes")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--steps", type=int, default=None, help="training steps (300; tiny 4)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (steps//10, <=30)")
    ap.add_argument(
        "--budget-s", type=float, default=None, help="whole-script limit (480; tiny 300)"
    )
    ap.add_argument("--workdir", default=None, help="parent of the temporary folder")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--out", default=None, help="copy the JSON and the logs here")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument(
        "--smoke-only", action="store_true", help="stop after the smoke phase (about 2 min)"
    )
    ap.add_argument("--skip-smoke", action="store_true", help="go straight to the measured runs")
    ap.add_argument(
        "--smoke-budget-s",
        type=float,
        default=None,
        help="limit of the smoke phase (150; tiny 600)",
    )
    ap.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra vpt_dml.run override for every preset run (repeatable), e.g. model.compile=true",
    )
    args = ap.parse_args()
    args.steps = args.steps or (4 if args.tiny else 300)
    budget = args.budget_s or (300.0 if args.tiny else 480.0)
    deadline = time.monotonic() + budget
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=args.workdir))
    procs = min(os.cpu_count() or 1, 2) if args.tiny else (os.cpu_count() or 1)
    summary: dict = {"mode": ("cpu" if args.cpu else "gpu") + ("-tiny" if args.tiny else "")}
    failures: list[str] = []
    try:
        if not args.skip_smoke:
            summary["smoke"] = smoke_phase(args, work, procs)
            failures += summary["smoke"]["failures"]
            if failures or args.smoke_only:
                if failures:
                    print("the smoke phase failed: the measured runs are not started", flush=True)
                raise StopAfterSmoke
        t = time.perf_counter()
        layouts = write_layouts(work / "data", args.tiny, procs)
        summary["data"] = {
            k: {
                "train": f"{v.train_classes} classes, {v.train_images} images",
                "test": f"{v.test_classes} classes, {v.test_images} images",
                "size": f"{v.image_size[0]}x{v.image_size[1]}",
            }
            for k, v in layouts.items()
        }
        summary["data_write_s"] = round(time.perf_counter() - t, 1)
        summary["data_write_processes"] = procs
        print(f"wrote the layouts in {summary['data_write_s']} s with {procs} processes: {work}")

        presets = summary["presets"] = {}
        for i, name in enumerate(args.presets):
            dataset = name.split("_")[0]
            if dataset not in layouts:
                failures.append(f"{name}: no fake layout for this preset (only sop*, cub*)")
                continue
            # a hung run leaves the later presets their share of the budget
            later = len(args.presets) - i - 1
            r = run_preset(name, layouts[dataset], work, args, deadline - PRESET_RESERVE_S * later)
            failures += r.pop("failures")
            presets[name] = r
            print(describe(name, r), flush=True)
        summary["bench"] = benches(args, work, deadline)
        for label, b in summary["bench"].items():
            print(describe_bench(label, b), flush=True)
        failures += [b["failure"] for b in summary["bench"].values() if "failure" in b]
        summary["sop_e2e_vs_bench_step"] = sop_vs_bench(presets, summary["bench"])
    except StopAfterSmoke:
        pass
    except Exception as err:  # noqa: BLE001 (a bug here must still end in the JSON line)
        import traceback

        traceback.print_exc()
        failures.append(f"gpu_check.py itself failed: {type(err).__name__}: {err}")
    finally:
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            for log in work.glob("*.log"):
                shutil.copy(log, out / log.name)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    summary["ok"] = not failures
    summary["failures"] = failures
    for f in failures:
        print(f"GPU CHECK FAILED: {f}", file=sys.stderr, flush=True)
        print(f"GPU CHECK FAILED: {f.splitlines()[0]}", flush=True)
    for r in (summary.get("presets") or {}).values():
        for w in r.get("warnings") or []:
            print(f"GPU CHECK WARNING: {w}", flush=True)
    if not failures:
        print("GPU CHECK PASSED", flush=True)
    line = json.dumps(summary, default=str)
    if args.out:
        (Path(args.out) / "gpu_check.json").write_text(line + "\n")
    print(line, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--launch-run":
        launch_run(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    else:
        sys.exit(main())
