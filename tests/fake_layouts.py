"""Tiny fake copies of the official dataset layouts, metadata in the official file formats.

Used by the tests only (and handy to try a loader without a download): the real loaders parse
them. Images are tiny JPEGs; the counts are small, not the official ones.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(seed: int, size: tuple[int, int] = (12, 10)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


_IMG = jpeg_bytes(0)


def put(path: Path, data: bytes = _IMG) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def fake_cub(root: Path, classes: int = 200, per_class: int = 1) -> Path:
    base = root / "CUB_200_2011"
    images, labels, names = [], [], []
    i = 0
    for c in range(1, classes + 1):
        folder = f"{c:03d}.Bird_{c}"
        names.append(f"{c} {folder}")
        for j in range(per_class):
            i += 1
            put(base / "images" / folder / f"Bird_{c}_{j}.jpg")
            images.append(f"{i} {folder}/Bird_{c}_{j}.jpg")
            labels.append(f"{i} {c}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "classes.txt").write_text("\n".join(names) + "\n")
    return root


def fake_cars(root: Path, per_class: tuple[int, ...] = (1, 2)) -> Path:
    """196 classes; class c has per_class[c % len(per_class)] images in car_ims/."""
    from scipy.io import savemat

    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    rows = []
    for c in range(1, 197):
        for _ in range(per_class[c % len(per_class)]):
            rel = f"car_ims/{len(rows) + 1:06d}.jpg"
            put(root / rel)
            rows.append((rel, 1, 2, 10, 8, c, len(rows) % 2))
    ann = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        for f, v in zip(fields, row):
            ann[0, i][f] = v
    names = np.array([f"Make Model {c}" for c in range(1, 197)], dtype=object).reshape(1, -1)
    savemat(str(root / "cars_annos.mat"), {"annotations": ann, "class_names": names})
    return root


def fake_sop(root: Path, train_classes: int = 5, test_classes: int = 4, per_class: int = 2) -> Path:
    base = root / "Stanford_Online_Products"
    image_id = 0
    for file, first, n in (
        ("Ebay_train.txt", 1, train_classes),
        ("Ebay_test.txt", 1 + train_classes, test_classes),
    ):
        lines = ["image_id class_id super_class_id path"]
        for c in range(first, first + n):
            for j in range(per_class):
                image_id += 1
                rel = f"bicycle_final/{1000 + c}_{j}.JPG"
                put(base / rel)
                lines.append(f"{image_id} {c} 1 {rel}")
        (base / file).write_text("\n".join(lines) + "\n")
    return root


def fake_inshop(root: Path) -> Path:
    """3 train items (2 images each); 2 test items, each with 2 query and 1 gallery image,
    plus a third test item present only in the gallery."""
    rows = []

    def add(item: int, j: int, status: str) -> None:
        rel = f"img/WOMEN/Dresses/id_{item:08d}/{j:02d}_1_front.jpg"
        put(root / "Img" / rel)
        rows.append(f"{rel} id_{item:08d} {status}")

    for item in (1, 2, 3):
        add(item, 1, "train"), add(item, 2, "train")
    for item in (10, 11):
        add(item, 1, "query"), add(item, 2, "query"), add(item, 3, "gallery")
    add(12, 1, "gallery")
    text = f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n"
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    (root / "Eval" / "list_eval_partition.txt").write_text(text)
    return root


def fake_inat(root: Path) -> Path:
    layout = {
        "Inaturalist_train_set1.txt": [("Plantae", 7477), ("Aves", 3)],
        "Inaturalist_test_set1.txt": [("Fungi", 12)],
    }
    for file, classes in layout.items():
        lines = []
        for sup, cid in classes:
            for j in range(3):
                rel = f"train_val2018/{sup}/{cid}/{cid}_{j}.jpg"
                put(root / rel)
                lines.append(rel)
        (root / file).write_text("\n".join(lines) + "\n")
    return root
