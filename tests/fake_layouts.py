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


# -- the official archives, built from the fake layouts (tests of vpt_dml.data.prepare) ---


def distinct_images(folder: Path) -> Path:
    """Give every image under folder its own bytes (the fakes share one JPEG)."""
    for i, p in enumerate(sorted(q for q in folder.rglob("*") if q.suffix.lower() == ".jpg")):
        p.write_bytes(jpeg_bytes(1000 + i))
    return folder


def pack(archive: Path, folder: Path, names: list[str]) -> Path:
    """folder/<name> entries into a .tgz / .tar.gz / .zip, as the official archives hold them."""
    import tarfile
    import zipfile

    archive.parent.mkdir(parents=True, exist_ok=True)
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as z:
            for name in names:
                top = folder / name
                for p in sorted([top, *top.rglob("*")] if top.is_dir() else [top]):
                    z.write(p, p.relative_to(folder).as_posix())
    else:
        with tarfile.open(archive, "w:gz") as t:
            for name in names:
                t.add(folder / name, name)
    return archive


def checksum_table(path: Path, files: list[Path]) -> Path:
    """The JSON the $VPT_DML_CHECKSUMS test hook reads: the real hashes of `files`."""
    import hashlib
    import json

    table = {
        f.name: {
            "size": f.stat().st_size,
            "md5": hashlib.md5(f.read_bytes()).hexdigest(),
            "sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
        }
        for f in files
    }
    path.write_text(json.dumps(table))
    return path


def _mat(path: Path, rows: list[dict], extra: dict | None = None) -> None:
    from scipy.io import savemat

    fields = list(rows[0])
    ann = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        for f in fields:
            ann[0, i][f] = row[f]
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {"annotations": ann, **(extra or {})})


def fake_cars_archives(out: Path, per_class: tuple[int, ...] = (1, 2)) -> dict[str, list[Path]]:
    """Both published Cars196 layouts of the same images: {"dml": [...], "classification": [...]}.

    Each image has its own bytes and box; the two layouts list them in different orders and
    under different names, as the real ones do."""
    rng = np.random.default_rng(0)
    images = []
    for c in range(1, 197):
        for _ in range(per_class[c % len(per_class)]):
            box = tuple(int(v) for v in rng.integers(1, 500, 4))
            images.append({"class": c, "bbox": box, "data": jpeg_bytes(5000 + len(images)),
                           "test": len(images) % 2})  # fmt: skip
    names = np.array([f"Make Model {c}" for c in range(1, 197)], dtype=object).reshape(1, -1)
    box = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")

    dml = out / "dml_src"
    rows = []
    for i, im in enumerate(images, 1):
        rel = f"car_ims/{i:06d}.jpg"
        put(dml / rel, im["data"])
        rows.append({"relative_im_path": rel, **dict(zip(box, im["bbox"])), "class": im["class"],
                     "test": im["test"]})  # fmt: skip
    _mat(dml / "cars_annos.mat", rows, {"class_names": names})
    (out / "dml").mkdir(parents=True, exist_ok=True)
    dml_files = [
        pack(out / "dml" / "car_ims.tgz", dml, ["car_ims"]),
        out / "dml" / "cars_annos.mat",
    ]
    (out / "dml" / "cars_annos.mat").write_bytes((dml / "cars_annos.mat").read_bytes())

    cls = out / "cls_src"
    order = rng.permutation(len(images))
    parts: dict[int, list[dict]] = {0: [], 1: []}
    for k in order:
        im = images[k]
        folder = "cars_test" if im["test"] else "cars_train"
        fname = f"{len(parts[im['test']]) + 1:05d}.jpg"
        put(cls / folder / fname, im["data"])
        parts[im["test"]].append(
            {**dict(zip(box, im["bbox"])), "class": im["class"], "fname": fname}
        )
    _mat(cls / "devkit" / "cars_train_annos.mat", parts[0])
    _mat(cls / "cars_test_annos_withlabels.mat", parts[1])
    from scipy.io import savemat

    savemat(str(cls / "devkit" / "cars_meta.mat"), {"class_names": names})
    dest = out / "classification"
    cls_files = [
        pack(dest / "cars_train.tgz", cls, ["cars_train"]),
        pack(dest / "cars_test.tgz", cls, ["cars_test"]),
        pack(dest / "car_devkit.tgz", cls, ["devkit"]),
        dest / "cars_test_annos_withlabels.mat",
    ]
    (dest / "cars_test_annos_withlabels.mat").write_bytes(
        (cls / "cars_test_annos_withlabels.mat").read_bytes()
    )
    return {"dml": dml_files, "classification": cls_files}


def fake_archives(name: str, out: Path) -> list[Path]:
    """The official archives of a tiny fake copy of `name` (cub, sop, inshop, inat) in out/."""
    src = out / f"{name}_src"
    if name == "cub":
        distinct_images(fake_cub(src, classes=4, per_class=2))
        return [pack(out / "CUB_200_2011.tgz", src, ["CUB_200_2011"])]
    if name == "sop":
        distinct_images(fake_sop(src, train_classes=2, test_classes=2))
        return [pack(out / "Stanford_Online_Products.zip", src, ["Stanford_Online_Products"])]
    if name == "inshop":
        distinct_images(fake_inshop(src))
        (out / "list_eval_partition.txt").write_bytes(
            (src / "Eval" / "list_eval_partition.txt").read_bytes()
        )
        return [pack(out / "img.zip", src / "Img", ["img"]), out / "list_eval_partition.txt"]
    if name == "inat":
        distinct_images(fake_inat(src))
        files = [pack(out / "train_val2018.tar.gz", src, ["train_val2018"])]
        for f in ("Inaturalist_train_set1.txt", "Inaturalist_test_set1.txt"):
            (out / f).write_bytes((src / f).read_bytes())
            files.append(out / f)
        return files
    raise ValueError(name)
