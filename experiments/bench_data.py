"""Training-pipeline throughput (decode + augment), this suite's loader vs torchvision's
default PIL pipeline, on the same JPEG files, in one run.

    python experiments/bench_data.py [--sizes 500x375 800x600] [--images 48] [--rounds 5]

Both pipelines run single-threaded in this process (as in one DataLoader worker), in
alternating rounds so that load from other processes hits both alike; the median round
counts. Prints a table and one final JSON line. Needs only torch, torchvision, numpy, PIL.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vpt_dml.data.dataset import load_transformed  # noqa: E402
from vpt_dml.data.transforms import build_transforms, eval_resize  # noqa: E402

MEAN = STD = (0.5, 0.5, 0.5)


def write_jpegs(folder: Path, n: int, w: int, h: int) -> list[str]:
    """Photo-like JPEGs (smooth structure + texture + noise) at quality 90."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        base = rng.random((h // 16 + 1, w // 16 + 1, 3)) * 255
        img = Image.fromarray(base.astype(np.uint8)).resize((w, h), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, (h, w, 3))
        path = folder / f"{w}x{h}_{i:03d}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
        paths.append(str(path))
    return paths


def torchvision_default(size: int, train: bool):
    """What a plain torchvision recipe does: PIL decode, then the Compose."""
    if train:
        tf = T.Compose(
            [
                T.RandomResizedCrop(size),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(MEAN, STD),
            ]
        )
    else:
        tf = T.Compose(
            [T.Resize(eval_resize(size)), T.CenterCrop(size), T.ToTensor(), T.Normalize(MEAN, STD)]
        )

    def load(path: str) -> torch.Tensor:
        with Image.open(path) as im:
            return tf(im.convert("RGB"))

    return load


def suite_loader(size: int, train: bool):
    tf = build_transforms(size, MEAN, STD, train=train, fast=True)
    return lambda path: load_transformed(path, tf)


def images_per_s(load, paths: list[str], device: torch.device) -> float:
    start = time.perf_counter()
    batch = torch.stack([load(p) for p in paths])
    batch.to(device, non_blocking=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=["500x375", "800x600"],
        help="image sizes WxH (CUB/SOP-like and iNat/Cars-like by default)",
    )
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--crop", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one DataLoader worker's view
    device = torch.device(args.device)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.sizes:
            w, h = (int(v) for v in spec.lower().split("x"))
            paths = write_jpegs(Path(tmp), args.images, w, h)
            for stage, train in (("train", True), ("eval", False)):
                pipes = {
                    "torchvision": torchvision_default(args.crop, train),
                    "suite": suite_loader(args.crop, train),
                }
                for load in pipes.values():  # warm-up
                    images_per_s(load, paths[:4], device)
                rates: dict[str, list[float]] = {k: [] for k in pipes}
                for _ in range(args.rounds):
                    for name, load in pipes.items():
                        torch.manual_seed(0)
                        rates[name].append(images_per_s(load, paths, device))
                med = {k: statistics.median(v) for k, v in rates.items()}
                key = f"{stage}_{w}x{h}"
                results[key] = {
                    "torchvision_img_s": round(med["torchvision"], 1),
                    "suite_img_s": round(med["suite"], 1),
                    "ratio": round(med["suite"] / med["torchvision"], 2),
                }
                print(
                    f"{key:>16}: torchvision {med['torchvision']:7.1f} img/s   suite {med['suite']:7.1f} img/s"
                    f"   ratio {results[key]['ratio']:.2f}x"
                )
    print(
        json.dumps(
            {
                "bench": "data_pipeline",
                "device": str(device),
                "crop": args.crop,
                "images": args.images,
                "rounds": args.rounds,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
