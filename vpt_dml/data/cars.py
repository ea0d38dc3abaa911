"""Cars196 in its official layout (or one folder per class, see class_folders.py).

    <root>/cars_annos.mat   MATLAB struct array `annotations`: relative_im_path,
                            bbox_x1..bbox_y2, class (1..196), test (the classification split)
    <root>/car_ims/*.jpg

Zero-shot split (METHOD.md §4): classes 1-98 train, 99-196 test; the `test` flag is unused.
"""

from __future__ import annotations

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
