"""Bad dataset copies end with one clear line, or are skipped and counted on request."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from tests.fake_layouts import fake_cub, fake_sop, jpeg_bytes, put
from vpt_dml.data.datamodule import RetrievalDataModule
from vpt_dml.data.dataset import SKIPPED_LABEL, EvalDataset, ImageDataset
from vpt_dml.data.records import ImageRecords
from vpt_dml.data.registry import load_splits
from vpt_dml.data.transforms import build_transforms
from vpt_dml.data.verify import main as verify_main
from vpt_dml.errors import DatasetError


def truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "name,expected",
    [
        ("cub", "CUB_200_2011/images.txt"),
        ("cars", "cars_annos.mat"),
        ("sop", "Ebay_train.txt"),
        ("inshop", "list_eval_partition.txt"),
        ("inat", "Inaturalist_train_set1.txt"),
    ],
)
def test_wrong_root_names_layout_and_source(tmp_path: Path, name: str, expected: str):
    (tmp_path / "stray.txt").write_text("not a dataset")
    for root in (tmp_path, tmp_path / "does-not-exist"):
        with pytest.raises(DatasetError) as info:
            load_splits(name, str(root))
        msg = str(info.value)
        assert expected in msg and "download" in msg and "\n" not in msg


def test_missing_metadata_file(tmp_path: Path):
    root = fake_cub(tmp_path, classes=4)
    (root / "CUB_200_2011" / "image_class_labels.txt").unlink()
    with pytest.raises(DatasetError, match="missing metadata file .*image_class_labels.txt"):
        load_splits("cub", str(root))


def test_listed_but_missing_file_at_startup(tmp_path: Path):
    root = fake_sop(tmp_path)
    gone = root / "Stanford_Online_Products" / "bicycle_final" / "1002_1.JPG"
    gone.unlink()
    dm = RetrievalDataModule(name="sop", root=str(root), strict_counts=False, num_workers=0)
    with pytest.raises(DatasetError, match=r"1 image\(s\) listed .* missing, first: .*1002_1\.JPG"):
        dm.load()
    dm = RetrievalDataModule(
        name="sop", root=str(root), strict_counts=False, skip_broken=True, num_workers=0
    )
    assert len(dm.load().train) == 9 and dm.count_report["skipped_missing"] == 1
    assert str(gone) not in dm.splits.train.paths


def test_skipping_the_last_image_of_a_class_is_an_error(tmp_path: Path):
    root = fake_sop(tmp_path, per_class=1)
    (root / "Stanford_Online_Products" / "bicycle_final" / "1003_0.JPG").unlink()
    dm = RetrievalDataModule(
        name="sop", root=str(root), strict_counts=False, skip_broken=True, num_workers=0
    )
    with pytest.raises(DatasetError, match="train class 3 has no images left"):
        dm.load()


def records_with_corrupt(tmp_path: Path) -> tuple[ImageRecords, str]:
    paths = [put(tmp_path / f"{i}.jpg", jpeg_bytes(i, (40, 30))) for i in range(4)]
    truncate(paths[1])
    return ImageRecords(paths, [0, 0, 1, 1]), paths[1]


@pytest.mark.parametrize("fast", [True, False])
def test_corrupt_image_is_named(tmp_path: Path, fast: bool):
    records, bad = records_with_corrupt(tmp_path)
    ds = ImageDataset(records, build_transforms(16, (0.5,) * 3, (0.5,) * 3, train=True, fast=fast))
    ds[0]
    with pytest.raises(DatasetError, match=rf"cannot decode image {bad} .*data.skip_broken=true"):
        ds[1]


def test_skip_broken_substitutes_in_training_and_drops_in_eval(tmp_path: Path):
    records, bad = records_with_corrupt(tmp_path)
    tf = build_transforms(16, (0.5,) * 3, (0.5,) * 3, train=False)
    image, label, index = ImageDataset(records, tf, skip_broken=True)[1]
    assert (label, index) == (0, 0)  # the other image of class 0
    ev = EvalDataset(records, None, tf, skip_broken=True)
    image, label, index = ev[1]
    assert (label, index) == (SKIPPED_LABEL, 1) and image.shape == (3, 16, 16)
    assert ev.skipped_paths() == [bad]


def test_worker_error_keeps_its_one_line(tmp_path: Path):
    records, bad = records_with_corrupt(tmp_path)
    ds = ImageDataset(records, build_transforms(16, (0.5,) * 3, (0.5,) * 3, train=False))
    with pytest.raises(DatasetError) as info:
        list(DataLoader(ds, batch_size=4, num_workers=1))
    assert str(info.value).startswith(f"cannot decode image {bad}") and "\n" not in str(info.value)


def test_skips_in_worker_processes_are_counted(tmp_path: Path):
    records, bad = records_with_corrupt(tmp_path)
    ds = ImageDataset(
        records, build_transforms(16, (0.5,) * 3, (0.5,) * 3, train=False), skip_broken=True
    )
    batches = list(DataLoader(ds, batch_size=4, num_workers=1))
    assert batches[0][2].tolist() == [0, 0, 2, 3]
    assert ds.skipped_paths() == [bad]


def test_verify_cli_lists_every_problem(tmp_path: Path, capsys):
    root = fake_cub(tmp_path, classes=4, per_class=2)
    images = sorted((root / "CUB_200_2011" / "images").rglob("*.jpg"))
    put(images[0], jpeg_bytes(1, (40, 30)))
    truncate(str(images[0]))
    images[3].unlink()
    assert verify_main(["cub", str(root)]) == 1
    out = capsys.readouterr().out
    assert "count train_images: found 4 expected 5864" in out
    assert f"missing file: {images[3]}" in out and "cannot decode" not in out
    assert verify_main(["cub", str(root), "--decode"]) == 1
    assert f"cannot decode: {images[0]}" in capsys.readouterr().out
    assert verify_main(["cub", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("error: data.root")


def test_torch_shared_flags_are_visible_across_processes():
    # the mechanism the skip counter relies on
    flags = torch.zeros(3, dtype=torch.uint8).share_memory_()
    assert flags.is_shared()
