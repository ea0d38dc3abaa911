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
   spawned process per CPU core (never forked: issue 30): SOP (Ebay_train.txt / Ebay_test.txt, 11,318 training classes x 2
   images, 2,000 test classes x 5, 400x400) and CUB-200-2011 (images.txt,
   image_class_labels.txt, images/NNN.Name/*.jpg, 200 classes x 30, 500x375). The pixels
   are cheap blocky patterns (one per class, jittered per image), but every file is a real
   JPEG of that size, so decoding and resizing cost what they cost on the real datasets;
2. runs `vpt_dml.run` on `+experiment=sop_deep` and `+experiment=cub_deep` with random
   backbone weights, `data.strict_counts=false`, a bounded number of training steps
   (`--steps`, default 300: SOP's fake epoch is longer, so it stops after 300 batches of
   its first epoch; CUB's is 46 batches, so it runs 7 whole epochs), the evaluation before
   training and the test after it, and everything else as the preset sets it (precision, class-prompt bank, workers, batch sizes, eval
   cadence). Each run is `python -m vpt_dml.run` in a subprocess (runpy, exactly what `-m`
   does) with one extra Lightning callback (`gpu_check_lib/probe.py`) that measures what
   the run's own record does not;
3. fails loudly - a `GPU CHECK FAILED:` line per problem, exit status 1 - on a crash,
   a non-finite loss (the probe's per-step losses and csv/metrics.csv) or a metric outside
   [0, 1] (metrics.json, old flat layout or the newer final/best/before keys, and the csv);
4. prints per preset, from the run's metrics.json `cost` block: training images/s after
   warm-up (the same warm-up: `callbacks.cost.warmup_steps`; data loading, bank and
   logging included; evaluations and checkpoint writes excluded), evaluation seconds and
   peak memory; and from the probe: GPU utilisation (NVML through
   torch.cuda.utilization, else nvidia-smi, sampled while training), the k-means share of
   each evaluation, the class-prompt bank's transfer time per
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
its 9 variants on 2 shared cores). tests/documented/test_gpu_check_cpu_tiny.py runs this mode.

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

  then run `pytest -m slow tests/documented/test_gpu_check_cpu_tiny.py` here, and make one call with the
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
import sys
from pathlib import Path

# the library beside this script (already on the path when it runs as a script, not when
# tests load it by file); the names imported unused (F401) are what tests/unit/test_gpu_check.py
# reads from this script
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check_lib.check import run_check  # noqa: E402
from gpu_check_lib.checks import check_csv, check_losses, check_metrics_json  # noqa: E402,F401
from gpu_check_lib.layouts import Layout, write_layouts  # noqa: E402,F401
from gpu_check_lib.presets import PRESETS  # noqa: E402
from gpu_check_lib.projection import measured, project, validated_epochs  # noqa: E402,F401


def parse_args(argv=None) -> argparse.Namespace:
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
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_check(args)


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--launch-run":
        from gpu_check_lib.probe import launch_run  # torch and Lightning: only in the run's process

        launch_run(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    else:
        sys.exit(main())
