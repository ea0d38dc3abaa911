"""Cars196 in its official layout (or one folder per class, see class_folders.py).

    <root>/cars_annos.mat   MATLAB struct array `annotations`: relative_im_path,
                            bbox_x1..bbox_y2, class (1..196), test (the classification split)
    <root>/car_ims/*.jpg

Zero-shot split (METHOD.md §4): classes 1-98 train, 99-196 test; the `test` flag is unused.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vpt_dml.data.layout import find_base, split_by_class_id
from vpt_dml.data.records import RetrievalSplits
from vpt_dml.errors import DatasetError

OFFICIAL_COUNTS = {
    "train_images": 8054,
    "train_classes": 98,
    "test_images": 8131,
    "test_classes": 98,
}
SOURCE = "https://ai.stanford.edu/~jkrause/cars/car_dataset.html (cars_annos.mat + car_ims.tgz)"
EXPECTED = "<root>/cars_annos.mat and <root>/car_ims/"


def find_cars_dir(root: str | Path) -> Path:
    return find_base(root, "cars_annos.mat", ["cars196", "Cars196"], "Cars196", EXPECTED, SOURCE)


def load_cars(root: str | Path, num_train_classes: int = 98) -> RetrievalSplits:
    from scipy.io import loadmat  # only this loader needs scipy

    base = find_cars_dir(root)
    try:
        mat = loadmat(str(base / "cars_annos.mat"), squeeze_me=True)
        ann = mat["annotations"]
        rel_paths = [str(p) for p in np.atleast_1d(ann["relative_im_path"])]
        class_ids = np.atleast_1d(ann["class"]).astype(np.int64)
    except (ValueError, KeyError, OSError, TypeError, IndexError) as e:
        raise DatasetError(
            f"cannot read {base / 'cars_annos.mat'} ({e}); download it again from {SOURCE}"
        ) from None
    names = [str(n) for n in np.atleast_1d(mat.get("class_names", []))]
    paths = [str(base / p) for p in rel_paths]
    # class c (1-based in the .mat) is named "c (make model year)"
    names_by_id = {
        c: f"{c} ({names[c - 1]})" if 0 < c <= len(names) else str(c)
        for c in set(class_ids.tolist())
    }
    return split_by_class_id("cars", paths, class_ids, num_train_classes, names_by_id)


# -- one canonical tree from either published layout (vpt_dml.data.prepare) -------------
#
# The DML archives (car_ims.tgz + cars_annos.mat) and the classification ones (cars_train,
# cars_test, devkit, test labels) name the same 16,185 images differently. Both carry each
# image's class and bounding box, so prepare renames every image to its rank in the order
# (class, bbox, content SHA-256): either layout then gives the same files under the same
# names, and the same split.json.
BBOX = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")


def _rows(mat_path: Path, path_field: str) -> list[dict]:
    from scipy.io import loadmat

    try:
        ann = np.atleast_1d(loadmat(str(mat_path), squeeze_me=True)["annotations"])
        return [
            {
                "path": str(a[path_field]),
                "class": int(a["class"]),
                "bbox": tuple(int(a[b]) for b in BBOX),
            }
            for a in ann
        ]
    except (ValueError, KeyError, OSError, TypeError, IndexError) as e:
        raise DatasetError(f"cannot read {mat_path} ({e}); the archive is damaged") from None


def _class_names(mat_path: Path) -> list[str]:
    from scipy.io import loadmat

    return [str(n) for n in np.atleast_1d(loadmat(str(mat_path), squeeze_me=True)["class_names"])]


def dml_layout_images(src: Path) -> tuple[list[dict], list[str]]:
    """(rows with absolute paths + test flag, class names) of car_ims/ + cars_annos.mat."""
    from scipy.io import loadmat

    rows = _rows(src / "cars_annos.mat", "relative_im_path")
    ann = np.atleast_1d(loadmat(str(src / "cars_annos.mat"), squeeze_me=True)["annotations"])
    for row, a in zip(rows, ann):
        row["path"], row["test"] = str(src / row["path"]), int(a["test"])
    return rows, _class_names(src / "cars_annos.mat")


def classification_layout_images(src: Path) -> tuple[list[dict], list[str]]:
    """The same from cars_train/, cars_test/, devkit/ and cars_test_annos_withlabels.mat."""
    rows = []
    for folder, mat, test in (
        ("cars_train", src / "devkit" / "cars_train_annos.mat", 0),
        ("cars_test", src / "cars_test_annos_withlabels.mat", 1),
    ):
        for row in _rows(mat, "fname"):
            row["path"], row["test"] = str(src / folder / row["path"]), test
            rows.append(row)
    return rows, _class_names(src / "devkit" / "cars_meta.mat")


def write_canonical(rows: list[dict], class_names: list[str], root: Path) -> None:
    """car_ims/NNNNNN.jpg + cars_annos.mat under root, images hard-linked (copied across
    filesystems) from their extracted sources; an interrupted run is redone from scratch."""
    import hashlib
    import shutil

    from scipy.io import savemat

    for row in rows:
        row["sha"] = hashlib.sha256(Path(row["path"]).read_bytes()).hexdigest()
    rows = sorted(rows, key=lambda r: (r["class"], r["bbox"], r["sha"]))
    tmp = root / ".car_ims.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    fields = ["relative_im_path", *BBOX, "class", "test"]
    ann = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows, 1):
        rel = f"car_ims/{i:06d}.jpg"
        try:
            os.link(row["path"], tmp / Path(rel).name)
        except OSError:
            shutil.copyfile(row["path"], tmp / Path(rel).name)
        for f, v in zip(fields, (rel, *row["bbox"], row["class"], row["test"])):
            ann[0, i - 1][f] = v
    names = np.array(class_names, dtype=object).reshape(1, -1)
    mat = tmp / "cars_annos.mat"
    savemat(str(mat), {"annotations": ann, "class_names": names})
    # the 116-byte text header holds a timestamp: fixed, so a rerun writes the same bytes
    data = bytearray(mat.read_bytes())
    data[:116] = b"MATLAB 5.0 MAT-file, written by vpt_dml.data.prepare".ljust(116)
    mat.write_bytes(bytes(data))
    if (root / "car_ims").exists():
        shutil.rmtree(root / "car_ims")
    os.replace(tmp / "cars_annos.mat", root / "cars_annos.mat")
    os.replace(tmp, root / "car_ims")
