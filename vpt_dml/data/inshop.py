"""In-Shop Clothes Retrieval (DeepFashion) in its official layout.

    list_eval_partition.txt   line 1: image count; line 2: header
                              "image_name item_id evaluation_status"; then one row per image,
                              status train | query | gallery
    img/...                   the paths in column 1 are relative to the folder holding img/

Found at <root>/ or <root>/Eval/; images at <root>/img or <root>/Img/img. Test queries are
ranked against the gallery only (METHOD.md §5). `images="img_highres"` reads the same list
from img_highres/ (the high-resolution copy, same names); None: img/ when present, else
img_highres/. The choice is kept in `splits.info["images"]`: papers rarely say which.
"""

from __future__ import annotations

from pathlib import Path

from vpt_dml.data.layout import find_base, read_rows
from vpt_dml.data.records import ImageRecords, RetrievalSplits, named_records
from vpt_dml.errors import DatasetError

OFFICIAL_COUNTS = {
    "train_images": 25882,
    "train_classes": 3997,
    "test_images": 14218,
    "test_classes": 3985,
    "gallery_images": 12612,
}
SOURCE = "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html"
EXPECTED = "<root>/list_eval_partition.txt (or <root>/Eval/) and <root>/img/ (or <root>/Img/img/)"


IMAGE_FOLDERS = ("img", "img_highres")


def load_inshop(root: str | Path, images: str | None = None) -> RetrievalSplits:
    meta = find_base(root, "list_eval_partition.txt", ["Eval"], "In-Shop", EXPECTED, SOURCE)
    root = Path(root).expanduser()
    bases = (root, root / "Img", meta)
    if images is None:
        images = next((f for f in IMAGE_FOLDERS if any((b / f).is_dir() for b in bases)), "img")
    if images not in IMAGE_FOLDERS:
        raise DatasetError(
            f"In-Shop images {images!r}: choose img or img_highres (data.inshop_images=img)"
        )
    image_base = next((b for b in bases if (b / images).is_dir()), root)
    path = meta / "list_eval_partition.txt"
    rows = read_rows(path, columns=3, skip=2)
    declared = path.read_text().split(maxsplit=1)[0]
    if declared.isdigit() and int(declared) != len(rows):
        raise DatasetError(
            f"{path} declares {declared} images on line 1 but lists {len(rows)}; the file is truncated"
        )
    by_status: dict[str, tuple[list[str], list[int]]] = {
        s: ([], []) for s in ("train", "query", "gallery")
    }
    for name, item, status in (r[:3] for r in rows):
        if status not in by_status:
            raise DatasetError(
                f"{path}: unknown evaluation_status {status!r} for {name}; expected train, query or gallery"
            )
        if images != "img" and name.startswith("img/"):
            name = images + name[3:]
        by_status[status][0].append(str(image_base / name))
        by_status[status][1].append(int(item.removeprefix("id_")))
    train_paths, train_ids = by_status["train"]
    (q_paths, q_ids), (g_paths, g_ids) = by_status["query"], by_status["gallery"]
    item_names = {i: f"id_{i:08d}" for i in set(train_ids + q_ids + g_ids)}
    # one label space for queries and gallery, so a query's positives are found in the gallery
    test = named_records(q_paths + g_paths, q_ids + g_ids, item_names)
    query = ImageRecords(q_paths, test.labels[: len(q_ids)], test.class_names)
    gallery = ImageRecords(g_paths, test.labels[len(q_ids) :], test.class_names)
    train = named_records(train_paths, train_ids, item_names)
    return RetrievalSplits("inshop", train, query, gallery, info={"images": images})
