"""LightningDataModule: splits, transforms, class-balanced training batches, eval loaders."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from vpt_dml.data.dataset import EvalDataset, ImageDataset
from vpt_dml.data.manifest import FILE as MANIFEST
from vpt_dml.data.manifest import read_sha256, split_sha256, write_manifest
from vpt_dml.data.records import RetrievalSplits
from vpt_dml.data.registry import count_mismatches, load_splits
from vpt_dml.data.sampler import build_batch_sampler, check_sampler
from vpt_dml.data.synthetic import write_synthetic_cub
from vpt_dml.data.transforms import build_transforms
from vpt_dml.data.verify import missing_files
from vpt_dml.errors import DatasetError, UserError

log = logging.getLogger(__name__)


class RetrievalDataModule(L.LightningDataModule):
    def __init__(
        self,
        name: str = "synthetic",
        root: str | None = None,
        batch_size: int = 32,
        samples_per_class: int = 2,
        eval_batch_size: int = 128,
        num_workers: int = 4,
        val_classes: float = 0.0,
        strict_counts: bool = True,
        seed: int = 0,
        synthetic: dict | None = None,
        image_size: int = 224,
        mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        std: tuple[float, ...] = (0.5, 0.5, 0.5),
        recall_ks: tuple[int, ...] = (1, 2, 4, 8),
        skip_broken: bool = False,
        check_files: bool = True,
        fast_decode: bool = True,
        inshop_images: str | None = None,
        sampler: str = "balanced",
    ) -> None:
        super().__init__()
        self.name = name
        self.root = root
        self.batch_size = batch_size
        self.samples_per_class = samples_per_class
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.val_classes = val_classes
        self.strict_counts = strict_counts
        self.seed = seed
        self.synthetic = dict(synthetic or {})
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.recall_ks = tuple(recall_ks)
        self.skip_broken = skip_broken
        self.check_files = check_files
        self.fast_decode = fast_decode
        self.inshop_images = inshop_images
        self.sampler = check_sampler(sampler)
        self.splits: RetrievalSplits | None = None
        self.count_report: dict = {}

    # -- splits ------------------------------------------------------------------------
    def load(self) -> RetrievalSplits:
        """Parse the dataset once (idempotent); check counts against the official ones."""
        if self.splits is not None:
            return self.splits
        if self.name == "synthetic":
            if not self.root:
                raise DatasetError(
                    "data.root is empty: set it to a cache folder for the generated dataset"
                )
            root = write_synthetic_cub(Path(self.root), **self.synthetic)
            splits, official = load_splits("cub", str(root))
            splits.name = "synthetic"
            n, c = self.synthetic.get("images_per_class", 20), self.synthetic.get("num_classes", 20)
            official = {"train_images": n * (c // 2), "test_images": n * (c - c // 2)}
        else:
            if not self.root:
                raise DatasetError(
                    f"data.root is not set: point it at your {self.name} download (data.root=/path)"
                )
            options = {"images": self.inshop_images} if self.name == "inshop" else {}
            splits, official = load_splits(self.name, self.root, **options)
        summary = splits.summary()
        problems = count_mismatches(summary, official) if official else []
        self.count_report = {"counts": summary, "official": official, "mismatches": problems}
        self.count_report.update(self._identity(splits))
        if problems:
            msg = f"{self.name} at {self.root} does not match the official split ({'; '.join(problems)})"
            if self.strict_counts:
                raise DatasetError(
                    msg + "; fix the copy or set data.strict_counts=false to train on it anyway"
                )
            log.warning(msg)
        if self.check_files:
            splits = self._drop_missing(splits)
        self.splits = self._hold_out_val(splits)
        return self.splits

    def _identity(self, splits: RetrievalSplits) -> dict:
        """What tells this run's data apart from another's: the split manifest's hash, the
        decode path, In-Shop's image folder and its queries that no gallery image matches
        (evaluation leaves those out: counted here so the recall is read correctly)."""
        out = {
            "split_sha256": split_sha256(splits),
            "decode": "fast" if self.fast_decode else "torchvision",
        }
        root = splits.info.get("root")
        on_disk = read_sha256(root) if root else None
        if root and on_disk is None and rank_zero_only.rank == 0:
            try:
                write_manifest(root, splits)
                on_disk = out["split_sha256"]
            except OSError as e:  # a read-only dataset folder is common: the hash is kept here
                log.warning("cannot write %s/%s (%s)", root, MANIFEST, e)
        if on_disk is not None and on_disk != out["split_sha256"]:
            log.warning(
                "%s/%s was written for another split (%s); this copy's is %s: the files "
                "changed since it was prepared (delete split.json to accept the copy as it is)",
                root,
                MANIFEST,
                on_disk[:12],
                out["split_sha256"][:12],
            )
            out["split_json_sha256"] = on_disk
        if "images" in splits.info:
            out["inshop_images"] = splits.info["images"]
        if splits.gallery is not None:
            alone = ~np.isin(splits.test.labels, splits.gallery.labels)
            out["queries_without_gallery"] = int(alone.sum())
            if alone.any():
                log.warning(
                    "%s: %d of %d queries have no gallery image of their class (first: %s) "
                    "and are left out of every metric",
                    self.name,
                    int(alone.sum()),
                    len(alone),
                    splits.test.paths[int(np.flatnonzero(alone)[0])],
                )
        return out

    def _drop_missing(self, splits: RetrievalSplits) -> RetrievalSplits:
        """Every listed file must exist; with data.skip_broken they are dropped and counted."""
        missing = missing_files(splits)
        if not missing:
            return splits
        if not self.skip_broken:
            raise DatasetError(
                f"{len(missing)} image(s) listed in the {self.name} metadata are missing, first: {missing[0]}; "
                f"re-extract the dataset, or set data.skip_broken=true to train without them "
                f"(python -m vpt_dml.data.verify {self.name} {self.root} lists them all)"
            )
        log.warning(
            "%s: skipping %d missing image(s), first: %s", self.name, len(missing), missing[0]
        )
        self.count_report["skipped_missing"] = len(missing)
        gone = set(missing)
        for part, records in splits.all_records():
            kept = records.subset(np.array([p not in gone for p in records.paths], dtype=bool))
            lost = np.setdiff1d(np.unique(records.labels), np.unique(kept.labels))
            if lost.size:
                raise DatasetError(
                    f"{self.name} {part} class {records.class_name(lost[0])} has no images left "
                    "after skipping missing files; the class is empty, re-extract the dataset"
                )
            setattr(splits, part, kept)
        return splits

    def _hold_out_val(self, splits: RetrievalSplits) -> RetrievalSplits:
        """data.val_classes=F: the last fraction F of the train classes become a val split."""
        self.val_records = None
        if not self.val_classes:
            return splits
        classes = np.unique(splits.train.labels)
        n_val = max(int(round(len(classes) * self.val_classes)), 1)
        val_mask = np.isin(splits.train.labels, classes[-n_val:])
        self.val_records = splits.train.subset(val_mask)
        splits.train = splits.train.subset(~val_mask)
        return splits

    @property
    def num_classes(self) -> int:
        return self.load().train.num_classes

    def set_preprocessing(
        self, image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        """The backbone's own input size and normalisation; takes effect at the next setup."""
        if int(image_size) < 1 or len(mean) != len(std):
            raise UserError(
                f"preprocessing image_size={image_size}, mean={tuple(mean)}, std={tuple(std)} "
                "is not a valid image size with one mean and std per channel"
            )
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)
        self.train_set = None  # datasets built earlier used the old transforms

    def setup(self, stage: str | None = None) -> None:
        splits = self.load()
        if getattr(self, "train_set", None) is not None:
            return  # fit then test: keep the datasets (and their skipped-image records)
        self._warn_repeats(splits.train)
        size, mean, std, fast = self.image_size, self.mean, self.std, self.fast_decode
        train_tf = build_transforms(size, mean, std, train=True, fast=fast)
        test_tf = build_transforms(size, mean, std, train=False, fast=fast)
        skip = self.skip_broken
        self.train_set = ImageDataset(splits.train, train_tf, skip)
        self.test_set = EvalDataset(splits.test, splits.gallery, test_tf, skip)
        # Without held-out classes, validation is the test split (what the paper reports).
        self.val_set = (
            EvalDataset(self.val_records, None, test_tf, skip)
            if self.val_records is not None
            else self.test_set
        )

    def _warn_repeats(self, train) -> None:
        """Classes smaller than samples_per_class repeat images within a batch (once per run)."""
        if getattr(self, "_warned_repeats", False) or rank_zero_only.rank != 0:
            return
        self._warned_repeats = True
        sizes = np.bincount(np.unique(train.labels, return_inverse=True)[1])
        short = int((sizes < self.samples_per_class).sum())
        if short:
            log.warning(
                "data.samples_per_class=%d but %d of %d training classes have fewer images "
                "(smallest: %d): those classes will repeat images within a batch",
                self.samples_per_class,
                short,
                len(sizes),
                int(sizes.min()),
            )

    def skipped_images(self) -> list[str]:
        """Images skipped as undecodable so far (data.skip_broken=true)."""
        sets = [getattr(self, a, None) for a in ("train_set", "val_set", "test_set")]
        return sorted({p for ds in sets if ds is not None for p in ds.skipped_paths()})

    def teardown(self, stage: str | None = None) -> None:
        skipped = self.skipped_images()
        if skipped:
            log.warning(
                "%s: skipped %d undecodable image(s), first: %s",
                self.name,
                len(skipped),
                skipped[0],
            )
            self.count_report["skipped_broken"] = len(skipped)
            self.count_report["skipped_broken_files"] = skipped[:100]

    # -- loaders -----------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def train_dataloader(self) -> DataLoader:
        world, rank = self._world()
        sampler = build_batch_sampler(
            self.sampler,
            self.train_set.records.labels,
            self.batch_size,
            self.samples_per_class,
            self.seed,
            world,
            rank,
        )
        return DataLoader(
            self.train_set,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=True,
            # Fresh workers each epoch, seeded from the main RNG: a run resumed from a
            # checkpoint then draws the same augmentations as a straight run.
            persistent_workers=False,
        )

    def _eval_loader(self, dataset: EvalDataset) -> DataLoader:
        world, rank = self._world()
        # Sharded without shuffling; padding duplicates are removed after the gather by index.
        sampler = DistributedSampler(dataset, world, rank, shuffle=False) if world > 1 else None
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=True,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)
