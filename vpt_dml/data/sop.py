"""Stanford Online Products in its official layout.

    <root>/Stanford_Online_Products/Ebay_train.txt   header, then
    <root>/Stanford_Online_Products/Ebay_test.txt    "image_id class_id super_class_id path"
    <root>/Stanford_Online_Products/<super>_final/*.JPG

The official files already form the zero-shot split (11,318 train / 11,316 test products).
"""

from __future__ import annotations

from pathlib import Path

from vpt_dml.data.layout import find_base, read_rows, records_from_rows
from vpt_dml.data.records import RetrievalSplits

OFFICIAL_COUNTS = {
    "train_images": 59551,
    "train_classes": 11318,
    "test_images": 60502,
    "test_classes": 11316,
}
SOURCE = "https://cvgl.stanford.edu/projects/lifted_struct/ (Stanford_Online_Products.zip)"
EXPECTED = "<root>/Stanford_Online_Products/Ebay_train.txt, Ebay_test.txt and the image folders"


def load_sop(root: str | Path) -> RetrievalSplits:
    base = find_base(
        root,
        "Ebay_train.txt",
        ["Stanford_Online_Products"],
        "Stanford Online Products",
        EXPECTED,
        SOURCE,
    )

    def part(file: str):
        rows = read_rows(base / file, columns=4, skip=1)
        return records_from_rows([str(base / r[3]) for r in rows], [int(r[1]) for r in rows])

    return RetrievalSplits("sop", part("Ebay_train.txt"), part("Ebay_test.txt"))
