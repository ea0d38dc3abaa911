"""Fake copies of the official dataset layouts with real JPEG files of the real sizes."""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path


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
    # spawned, not forked: a forked worker inherits every lock another thread of this
    # process holds (an import in flight, a lock inside a C library) without the thread
    # that would release it, and waits forever (issue 30: it hung pytest for 14 minutes)
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
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
