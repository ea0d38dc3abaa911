"""iNaturalist 2018 with the Smooth-AP retrieval split (Brown et al., ECCV 2020).

    <root>/Inaturalist_train_set1.txt   one image path per line, relative to <root>,
    <root>/Inaturalist_test_set1.txt    e.g. train_val2018/Plantae/7477/<hash>.jpg
    <root>/train_val2018/<super>/<category id>/*.jpg

The class is the category folder (the path's parent); train and test categories are disjoint.
"""

from __future__ import annotations

from pathlib import Path

from vpt_dml.data.layout import find_base, read_rows, records_from_rows
from vpt_dml.data.records import RetrievalSplits
from vpt_dml.errors import DatasetError

OFFICIAL_COUNTS = {
    "train_images": 325846,
    "train_classes": 5690,
    "test_images": 136093,
    "test_classes": 2452,
}
SOURCE = (
    "the iNaturalist 2018 images (github.com/visipedia/inat_comp/tree/master/2018) and the "
    "Smooth-AP split files (github.com/Andrew-Brown1/Smooth_AP)"
)
EXPECTED = "<root>/Inaturalist_train_set1.txt, Inaturalist_test_set1.txt and <root>/train_val2018/"


def load_inat(root: str | Path) -> RetrievalSplits:
    base = find_base(root, "Inaturalist_train_set1.txt", [], "iNaturalist 2018", EXPECTED, SOURCE)

    def part(file: str):
        rows = read_rows(base / file, columns=1)
        paths = [r[0] for r in rows]
        try:
            ids = [int(Path(p).parent.name) for p in paths]
        except ValueError:
            bad = next(p for p in paths if not Path(p).parent.name.isdigit())
            raise DatasetError(
                f"{base / file}: {bad!r} has no numeric category folder; expected train_val2018/<super>/<id>/<file>.jpg"
            ) from None
        return records_from_rows([str(base / p) for p in paths], ids)

    return RetrievalSplits(
        "inat", part("Inaturalist_train_set1.txt"), part("Inaturalist_test_set1.txt")
    )
