"""Every official layout, faked in its exact file format, parsed by the real loaders."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from tests.fake_layouts import fake_cars, fake_cub, fake_inat, fake_inshop, fake_sop, put
from vpt_dml.data import registry
from vpt_dml.data.datamodule import RetrievalDataModule
from vpt_dml.data.registry import load_splits
from vpt_dml.errors import DatasetError


def test_cub_first_hundred_classes_train(tmp_path: Path):
    splits, _ = load_splits("cub", str(fake_cub(tmp_path, per_class=2)))
    assert splits.summary() == {
        "train_images": 200,
        "train_classes": 100,
        "test_images": 200,
        "test_classes": 100,
    }
    assert all(int(Path(p).parent.name[:3]) <= 100 for p in splits.train.paths)
    assert all(int(Path(p).parent.name[:3]) > 100 for p in splits.test.paths)


def test_cars_mat_split_by_class_not_by_test_flag(tmp_path: Path):
    splits, official = load_splits("cars", str(fake_cars(tmp_path)))
    # odd classes have 2 images, even ones 1: 49*2 + 49 per half
    assert splits.summary() == {
        "train_images": 147,
        "train_classes": 98,
        "test_images": 147,
        "test_classes": 98,
    }
    assert official["train_images"] == 8054
    assert splits.train.paths[0].endswith("car_ims/000001.jpg")
    assert np.array_equal(np.unique(splits.train.labels), np.arange(98))


def test_sop_uses_official_files(tmp_path: Path):
    splits, _ = load_splits("sop", str(fake_sop(tmp_path)))
    assert splits.summary() == {
        "train_images": 10,
        "train_classes": 5,
        "test_images": 8,
        "test_classes": 4,
    }
    assert all(Path(p).is_file() for p in splits.train.paths + splits.test.paths)


def test_inshop_query_and_gallery(tmp_path: Path):
    splits, _ = load_splits("inshop", str(fake_inshop(tmp_path)))
    assert splits.summary() == {
        "train_images": 6,
        "train_classes": 3,
        "test_images": 4,
        "test_classes": 3,
        "gallery_images": 3,
    }
    # queries and gallery share one label space: item 10's query and gallery images agree
    q = dict(zip(splits.test.paths, splits.test.labels))
    g = dict(zip(splits.gallery.paths, splits.gallery.labels))
    q10 = {lab for p, lab in q.items() if "id_00000010" in p}
    g10 = {lab for p, lab in g.items() if "id_00000010" in p}
    assert q10 == g10 and len(q10) == 1
    assert not set(q) & set(g)


def test_inshop_truncated_partition_file(tmp_path: Path):
    root = fake_inshop(tmp_path)
    f = root / "Eval" / "list_eval_partition.txt"
    f.write_text("\n".join(f.read_text().splitlines()[:-2]) + "\n")
    with pytest.raises(DatasetError, match="declares 13 images on line 1 but lists 11"):
        load_splits("inshop", str(root))


def test_inat_class_is_category_folder(tmp_path: Path):
    splits, _ = load_splits("inat", str(fake_inat(tmp_path)))
    assert splits.summary() == {
        "train_images": 6,
        "train_classes": 2,
        "test_images": 3,
        "test_classes": 1,
    }
    by_label = {
        lab: {
            Path(p).parent.name
            for p, l2 in zip(splits.train.paths, splits.train.labels)
            if l2 == lab
        }
        for lab in set(splits.train.labels.tolist())
    }
    assert sorted(map(frozenset, by_label.values()), key=sorted) == [
        frozenset({"3"}),
        frozenset({"7477"}),
    ]


def test_class_folders_flat_numbered(tmp_path: Path):
    for c in (1, 2, 10, 11):  # numeric sort: 1, 2 train; 10, 11 test (not "10" < "2")
        for j in range(c % 3 + 1):
            put(tmp_path / f"{c:d}.name" / f"{j}.jpg")
    splits, _ = load_splits("cub", str(tmp_path))
    assert {Path(p).parent.name for p in splits.train.paths} == {"1.name", "2.name"}
    assert splits.summary()["test_images"] == (10 % 3 + 1) + (11 % 3 + 1)


def test_class_folders_classification_split_is_merged(tmp_path: Path):
    # Kaggle-style Cars196: every class in both train/ and test/
    for part in ("train", "test"):
        for name in ("Audi A4", "BMW M3", "Fiat 500", "Volvo XC90"):
            put(tmp_path / part / name / f"{part}.jpg")
    splits, _ = load_splits("cars", str(tmp_path))
    assert splits.summary() == {
        "train_images": 4,
        "train_classes": 2,
        "test_images": 4,
        "test_classes": 2,
    }
    assert {Path(p).parent.name for p in splits.test.paths} == {"Fiat 500", "Volvo XC90"}


def test_class_folders_presplit_used_as_given(tmp_path: Path):
    for part, names in (("train", ("a", "b", "c")), ("test", ("d",))):
        for name in names:
            put(tmp_path / part / name / "0.jpg")
    splits, _ = load_splits("cub", str(tmp_path))
    assert (splits.train.num_classes, splits.test.num_classes) == (3, 1)


def test_empty_class_folder_is_named(tmp_path: Path):
    put(tmp_path / "001.a" / "0.jpg")
    put(tmp_path / "002.b" / "0.jpg")
    (tmp_path / "003.c").mkdir()
    with pytest.raises(DatasetError, match=r"class folder .*003\.c holds no images"):
        load_splits("cub", str(tmp_path))


def test_count_check_names_the_difference(tmp_path: Path):
    root = fake_sop(tmp_path)
    dm = RetrievalDataModule(name="sop", root=str(root), num_workers=0)
    with pytest.raises(
        DatasetError, match="train_images: found 10 expected 59551.*strict_counts=false"
    ):
        dm.load()
    dm = RetrievalDataModule(name="sop", root=str(root), num_workers=0, strict_counts=False)
    assert dm.load().summary()["train_classes"] == 5
    assert "train_classes: found 5 expected 11318" in dm.count_report["mismatches"]


def test_exact_copy_passes_the_count_check(tmp_path: Path, monkeypatch):
    root = fake_inshop(tmp_path)
    exact = {
        "train_images": 6,
        "train_classes": 3,
        "test_images": 4,
        "test_classes": 3,
        "gallery_images": 3,
    }
    spec = dataclasses.replace(registry.DATASETS["inshop"], official=exact)
    monkeypatch.setitem(registry.DATASETS, "inshop", spec)
    dm = RetrievalDataModule(
        name="inshop", root=str(root), num_workers=0, batch_size=2, samples_per_class=1
    )
    dm.load()
    assert dm.count_report["mismatches"] == []
    dm.setup()
    assert dm.test_set.has_gallery
    assert dm.test_set.query_mask.sum().item() == 4 and dm.test_set.gallery_mask.sum().item() == 3
