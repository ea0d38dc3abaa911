"""A torch Dataset over `ImageRecords`: returns (image, label, index)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset

from vpt_dml.data.records import ImageRecords
from vpt_dml.errors import DatasetError


def load_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DatasetError(f"image listed in the dataset metadata is missing: {path}; re-extract the dataset") from None
    except OSError as e:
        raise DatasetError(
            f"cannot decode image {path} ({e}); replace the file or set data.skip_broken=true"
        ) from None


class ImageDataset(Dataset):
    def __init__(self, records: ImageRecords, transform: Callable | None = None) -> None:
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        image = load_rgb(self.records.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.records.labels[index]), index


class EvalDataset(ImageDataset):
    """Query set (and optional gallery) in one indexable set for sharded evaluation.

    `query_mask[i]` / `gallery_mask[i]` say whether item i is a query / gallery image; for
    a query-equals-gallery protocol both are all True.
    """

    def __init__(self, query: ImageRecords, gallery: ImageRecords | None, transform: Callable | None) -> None:
        if gallery is None:
            records = query
            self.query_mask = torch.ones(len(query), dtype=torch.bool)
            self.gallery_mask = self.query_mask
        else:
            records = ImageRecords(query.paths + gallery.paths, list(query.labels) + list(gallery.labels))
            self.query_mask = torch.arange(len(records)) < len(query)
            self.gallery_mask = ~self.query_mask
        self.has_gallery = gallery is not None
        super().__init__(records, transform)
