"""vpt_dml.data.prepare on tiny archives in the official formats (hashes through the
$VPT_DML_CHECKSUMS hook): the real loaders read what it writes, Cars' two layouts agree,
wrong bytes and unsafe members are refused, and an interrupted run finishes the same."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.fake_layouts import checksum_table, fake_archives, fake_cars_archives
from vpt_dml.data import registry
from vpt_dml.data.checksums import ENV
from vpt_dml.data.manifest import split_sha256
from vpt_dml.data.prepare import main, prepare
from vpt_dml.data.registry import load_splits
from vpt_dml.errors import UserError

# the fakes' own counts, in place of the official ones
FAKE_COUNTS = {
    "cub": {"train_images": 4, "train_classes": 2, "test_images": 4, "test_classes": 2},
    "sop": {"train_images": 4, "train_classes": 2, "test_images": 4, "test_classes": 2},
    "inshop": {
        "train_images": 6,
        "train_classes": 3,
        "test_images": 4,
        "test_classes": 3,
        "gallery_images": 3,
    },  # fmt: skip
    "inat": {"train_images": 6, "train_classes": 2, "test_images": 3, "test_classes": 1},
    "cars": {"train_images": 147, "train_classes": 98, "test_images": 147, "test_classes": 98},
}


@pytest.fixture(autouse=True)
def fake_official(monkeypatch):
    for name, counts in FAKE_COUNTS.items():
        spec = dataclasses.replace(registry.DATASETS[name], official=counts)
        monkeypatch.setitem(registry.DATASETS, name, spec)


def listed_as(monkeypatch, tmp_path: Path, files: list[Path], **extra) -> None:
    table = checksum_table(tmp_path / "table.json", files)
    if extra:
        data = json.loads(table.read_text())
        for name, values in extra.items():
            data.setdefault(name, {}).update(values)
        table.write_text(json.dumps(data))
    monkeypatch.setenv(ENV, str(table))


def tree(root: Path) -> dict[str, str]:
    """relative path -> content hash of every file under root (what a user finds there)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("name", ["cub", "sop", "inshop", "inat"])
def test_prepare_gives_the_layout_the_loader_reads_and_verifies(name, tmp_path, monkeypatch):
    files = fake_archives(name, tmp_path / "archives")
    listed_as(monkeypatch, tmp_path, files)
    root = tmp_path / "data"
    assert main([name, "--archives", str(tmp_path / "archives"), "--root", str(root),
                 "--decode", "--no-progress"]) == 0  # fmt: skip
    splits, _ = load_splits(name, str(root))
    assert splits.summary() == FAKE_COUNTS[name]
    # the images are the archive's, byte for byte, under the names the metadata lists
    source = tree(tmp_path / "archives" / f"{name}_src")
    prepared = tree(root)
    listed = [str(Path(p).relative_to(root)) for _, r in splits.all_records() for p in r.paths]
    for rel in listed:
        src_rel = rel.replace("img/", "Img/img/", 1) if name == "inshop" else rel
        assert prepared[rel] == source[src_rel]
    split = json.loads((root / "split.json").read_text())
    assert split["sha256"] == split_sha256(splits)
    info = json.loads((root / "prepared.json").read_text())
    assert {a["file"] for a in info["archives"]} == {f.name for f in files}
    assert all(a["checked"] == "matches the table" for a in info["archives"])
    assert not (root / ".partial").exists()


def test_cars_from_both_layouts_gives_the_same_files_and_manifest(tmp_path, monkeypatch):
    layouts = fake_cars_archives(tmp_path / "src")
    listed_as(monkeypatch, tmp_path, layouts["dml"] + layouts["classification"])
    trees, manifests = [], []
    for layout in ("dml", "classification"):
        root = tmp_path / layout
        problems = prepare("cars", tmp_path / "src" / layout, root, progress=False)
        assert problems == []
        trees.append({k: v for k, v in tree(root / "car_ims").items()})
        manifests.append(json.loads((root / "split.json").read_text()))
        splits, _ = load_splits("cars", str(root))
        assert splits.summary() == FAKE_COUNTS["cars"]
        assert manifests[-1]["sha256"] == split_sha256(splits)
        assert not (root / ".cars_source").exists()
    assert len(trees[0]) == 294 and trees[0] == trees[1]  # same image under the same name
    assert manifests[0] == manifests[1]
    train = {c for _, c, *_ in manifests[0]["splits"]["train"]["files"]}
    assert {int(c.split()[0]) for c in train} == set(range(1, 99))


def test_a_wrong_byte_is_refused_in_one_line_and_accept_unlisted_records_it(
    tmp_path, monkeypatch, capsys
):
    src = tmp_path / "archives"
    (archive,) = fake_archives("cub", src)
    listed_as(monkeypatch, tmp_path, [archive])
    good = hashlib.md5(archive.read_bytes()).hexdigest()
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    root = tmp_path / "data"
    args = ["cub", "--archives", str(src), "--root", str(root), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {archive}: MD5 expected {good}, found ")
    assert hashlib.md5(bytes(data)).hexdigest() in err[0] and "--accept-unlisted" in err[0]
    assert not root.exists() or not any(root.rglob("*"))

    # another valid archive under the listed name: prepared with the flag, its hash kept
    (other,) = fake_archives("sop", tmp_path / "other")
    listed_as(monkeypatch, tmp_path, [other])
    other.write_bytes(b"\0" * 0 + other.read_bytes())
    zipped = other.read_bytes()
    with zipfile.ZipFile(other, "a") as z:
        z.writestr("Stanford_Online_Products/extra.txt", "another version")
    assert main(["sop", "--archives", str(other.parent), "--root", str(root), "--no-progress"]) == 2
    assert main(["sop", "--archives", str(other.parent), "--root", str(root), "--no-progress",
                 "--accept-unlisted"]) == 0  # fmt: skip
    (record,) = json.loads((root / "prepared.json").read_text())["archives"]
    assert (
        record["sha256"]
        == hashlib.sha256(other.read_bytes()).hexdigest()
        != hashlib.sha256(zipped).hexdigest()
    )
    assert record["checked"].startswith("differs from the table")


def _tar_with(path: Path, bad: tarfile.TarInfo, payload: bytes = b"") -> Path:
    with tarfile.open(path, "w:gz") as t:
        ok = tarfile.TarInfo("CUB_200_2011/images.txt")
        ok.size = 3
        t.addfile(ok, io.BytesIO(b"1 a"))  # a good member first: it must not be written either
        bad.size = len(payload)
        t.addfile(bad, io.BytesIO(payload) if payload else None)
    return path


def _info(name: str, **kw) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(info, k, v)
    return info


@pytest.mark.parametrize(
    "kind, member, why",
    [
        ("absolute", lambda d: _info(str(d / "evil.txt")), "an absolute path"),
        ("dotdot", lambda d: _info("CUB_200_2011/../../evil.txt"), "a '..' path"),
        ("symlink", lambda d: _info("CUB_200_2011/link", type=tarfile.SYMTYPE,
                                   linkname="../../outside"), "outside the extraction folder"),
        ("abs-symlink", lambda d: _info("CUB_200_2011/link", type=tarfile.SYMTYPE,
                                       linkname="/etc/passwd"), "outside the extraction folder"),
        ("hardlink", lambda d: _info("CUB_200_2011/hard", type=tarfile.LNKTYPE,
                                    linkname="../outside"), "outside the extraction folder"),
        ("device", lambda d: _info("CUB_200_2011/dev", type=tarfile.CHRTYPE, devmajor=1,
                                  devminor=3), "a device or FIFO file"),
        ("zip-dotdot", None, "a '..' path"),
    ],
)  # fmt: skip
def test_each_unsafe_member_kind_is_refused_with_nothing_written(
    kind, member, why, tmp_path, monkeypatch
):
    src, root = tmp_path / "archives", tmp_path / "data"
    src.mkdir()
    if member is None:
        archive = src / "Stanford_Online_Products.zip"
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("Stanford_Online_Products/Ebay_train.txt", "header\n")
            z.writestr(zipfile.ZipInfo("Stanford_Online_Products/../../evil.txt"), "x")
        name = "sop"
    else:
        payload = b"x" if kind in ("absolute", "dotdot") else b""
        archive = _tar_with(src / "CUB_200_2011.tgz", member(tmp_path), payload)
        name = "cub"
    listed_as(monkeypatch, tmp_path, [archive])
    with pytest.raises(UserError, match=f"member .* is .*{why}.*refusing to extract anything"):
        prepare(name, src, root, progress=False)
    assert not any(root.rglob("*"))
    assert sorted(p.name for p in tmp_path.rglob("*evil*")) == []
    assert not (tmp_path / "outside").exists()


def test_an_interrupted_extraction_finishes_the_same_without_redoing_finished_archives(
    tmp_path, monkeypatch
):
    layouts = fake_cars_archives(tmp_path / "src")
    src = tmp_path / "src" / "classification"
    listed_as(monkeypatch, tmp_path, layouts["classification"])
    prepare("cars", src, tmp_path / "straight", progress=False)

    archives_seen = []

    def kill_in_second_archive(n: int) -> None:
        if n == 1:
            archives_seen.append(n)
        if len(archives_seen) == 2 and n == 5:
            raise KeyboardInterrupt  # what a Ctrl-C / kill mid-archive leaves behind

    root = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        prepare("cars", src, root, progress=False, after_member=kill_in_second_archive)
    assert (root / ".partial" / "cars_test.tgz").is_dir()  # half-extracted, not in place
    (src / "cars_train.tgz").unlink()  # finished before the interruption: not needed again
    assert prepare("cars", src, root, progress=False) == []
    assert tree(root) == tree(tmp_path / "straight")


def test_members_far_beyond_the_archives_size_are_refused(tmp_path, monkeypatch):
    src, root = tmp_path / "archives", tmp_path / "data"
    src.mkdir()
    archive = src / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as t:
        big = tarfile.TarInfo("CUB_200_2011/images.txt")
        big.size = 80 << 20  # zeros: 80 MiB out of a ~80 KiB archive
        t.addfile(big, io.BytesIO(bytes(big.size)))
    listed_as(monkeypatch, tmp_path, [archive])
    with pytest.raises(UserError, match=r"add up to 83,886,080 bytes, over 4x the file's own"):
        prepare("cub", src, root, progress=False)
    assert not any(root.rglob("*"))


def test_a_missing_archive_lists_what_the_dataset_needs(tmp_path, capsys):
    (tmp_path / "archives").mkdir()
    assert (
        main(["cars", "--archives", str(tmp_path / "archives"), "--root", str(tmp_path / "d")]) == 2
    )
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "car_ims.tgz, cars_annos.mat not found in" in line
    assert (
        "cars_train.tgz + cars_test.tgz + car_devkit.tgz + cars_test_annos_withlabels.mat" in line
    )
    assert '"Getting the datasets"' in line


def test_an_unsafe_later_archive_leaves_the_root_untouched(tmp_path, monkeypatch):
    layouts = fake_cars_archives(tmp_path / "src")
    src = tmp_path / "src" / "classification"
    with tarfile.open(src / "cars_test.tgz", "w:gz") as t:
        bad = tarfile.TarInfo("cars_test/../../evil.jpg")
        bad.size = 1
        t.addfile(bad, io.BytesIO(b"x"))
    listed_as(monkeypatch, tmp_path, layouts["classification"])
    root = tmp_path / "data"
    with pytest.raises(
        UserError, match="cars_test.tgz: member 'cars_test/../../evil.jpg' is a '..' path"
    ):
        prepare("cars", src, root, progress=False)
    assert not any(root.rglob("*"))  # cars_train.tgz, checked first and fine, not extracted either
