"""A torch Dataset over `ImageRecords`: returns (image, label, index).

A missing or undecodable image ends the run with a one-line `DatasetError` naming the file.
With `skip_broken=True` it is skipped instead and recorded in `broken` (a shared-memory
flag per image, so DataLoader worker processes report back to the main process):
training substitutes another image of the same class (the k-per-class batch stays
intact); evaluation returns label -1, which the metrics drop.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vpt_dml.data.images import to_rgb
from vpt_dml.data.records import ImageRecords
from vpt_dml.errors import DatasetError, UndecodableImage

SKIPPED_LABEL = -1


def missing_message(path: str) -> str:
    return f"image listed in the dataset metadata is missing: {path}; re-extract the dataset"


# How to get past an undecodable file, as a training run spells it; the CLIs pass their own.
SKIP_HINT = "replace the file or set data.skip_broken=true"


def decode_error(path: str, err: Exception, hint: str = SKIP_HINT) -> UndecodableImage:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return UndecodableImage(f"cannot decode image {path} ({reason}); {hint}", path, reason)


def load_transformed(path: str, transform: Callable | None, hint: str = SKIP_HINT):
    """Open lazily and hand the undecoded image to `transform` (so it may decode at a
    reduced JPEG scale); decoding errors become DatasetError naming the file and `hint`."""
    try:
        with Image.open(path) as im:
            if transform is None:
                return to_rgb(im)  # as displayed (data/images.py)
            return transform(im)
    except FileNotFoundError:
        raise DatasetError(missing_message(path)) from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's decoder errors
        raise decode_error(path, e, hint) from None


class ImageDataset(Dataset):
    def __init__(
        self, records: ImageRecords, transform: Callable | None = None, skip_broken: bool = False
    ) -> None:
        self.records = records
        self.transform = transform
        self.skip_broken = skip_broken
        # shared memory: writes from worker processes are visible here
        self.broken = torch.zeros(len(records), dtype=torch.uint8).share_memory_()
        labels = np.asarray(records.labels)
        order = np.argsort(labels, kind="stable")
        self._class_members = np.split(order, np.flatnonzero(np.diff(labels[order])) + 1)
        self._class_of = {int(labels[m[0]]): i for i, m in enumerate(self._class_members) if len(m)}

    def __len__(self) -> int:
        return len(self.records)

    def skipped_paths(self) -> list[str]:
        return [self.records.paths[i] for i in torch.nonzero(self.broken).flatten().tolist()]

    def _try_load(self, index: int):
        try:
            return load_transformed(self.records.paths[index], self.transform)
        except DatasetError:
            if not self.skip_broken:
                raise
            self.broken[index] = 1
            return None

    def __getitem__(self, index: int):
        label = int(self.records.labels[index])
        image = self._try_load(index)
        if image is not None:
            return image, label, index
        # Training: another image of the same class, the next one in file order.
        members = self._class_members[self._class_of[label]]
        start = int(np.flatnonzero(members == index)[0])
        for step in range(1, len(members)):
            other = int(members[(start + step) % len(members)])
            if self.broken[other]:
                continue
            image = self._try_load(other)
            if image is not None:
                return image, label, other
        raise DatasetError(
            f"every image of class {self.records.class_name(label)} is unreadable "
            f"(first: {self.records.paths[index]}); the class is empty, re-extract the dataset"
        )


class EvalDataset(ImageDataset):
    """Query set (and optional gallery) in one indexable set for sharded evaluation.

    `query_mask[i]` / `gallery_mask[i]` say whether item i is a query / gallery image; for
    a query-equals-gallery protocol both are all True.
    """

    def __init__(
        self,
        query: ImageRecords,
        gallery: ImageRecords | None,
        transform: Callable | None,
        skip_broken: bool = False,
    ) -> None:
        if gallery is None:
            records = query
            self.query_mask = torch.ones(len(query), dtype=torch.bool)
            self.gallery_mask = self.query_mask
        else:
            records = ImageRecords(
                query.paths + gallery.paths,
                list(query.labels) + list(gallery.labels),
                query.class_names,  # one label space (In-Shop)
            )
            self.query_mask = torch.arange(len(records)) < len(query)
            self.gallery_mask = ~self.query_mask
        self.has_gallery = gallery is not None
        super().__init__(records, transform, skip_broken)
        self._size = None

    def __getitem__(self, index: int):
        image = self._try_load(index)
        if image is not None:
            if self._size is None:
                self._size = tuple(image.shape) if torch.is_tensor(image) else None
            return image, int(self.records.labels[index]), index
        # Evaluation never substitutes: the item carries label -1 and is left out of the metrics.
        placeholder = torch.zeros(self._size or self._probe_shape())
        return placeholder, SKIPPED_LABEL, index

    def _probe_shape(self) -> tuple[int, ...]:
        for i in range(len(self)):
            if not self.broken[i]:
                image = self._try_load(i)
                if image is not None:
                    self._size = tuple(image.shape)
                    return self._size
        raise DatasetError(
            "no image of the evaluation split can be decoded; re-extract the dataset"
        )
