"""prepare against hostile or mistaken input (issue 28, items 8, 12, 13, 15): a replaced
archive under a prepared root, link chains that leave the folder only when followed, a small
file expanding far beyond its own size, a full disk, and the near misses users download."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.fake_layouts import fake_archives
from tests.unit.test_prepare import fake_official, listed_as, tree  # noqa: F401 (autouse fixture)
from vpt_dml.data import archives
from vpt_dml.data.prepare import main, prepare
from vpt_dml.data.verify import main as verify_main
from vpt_dml.errors import UserError


def _args(src: Path, root: Path, *extra: str) -> list[str]:
    return ["cub", "--archives", str(src), "--root", str(root), "--no-progress", *extra]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _repack(archive: Path, extra: dict[str, bytes]) -> None:
    """The same archive with extra regular members appended (another 'version' of it)."""
    with tarfile.open(archive) as t:
        members = [(m, t.extractfile(m).read() if m.isfile() else None) for m in t]
    with tarfile.open(archive, "w:gz") as t:
        for m, data in members:
            t.addfile(m, io.BytesIO(data) if data is not None else None)
        for name, data in extra.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


# -- item 8: a replaced archive --------------------------------------------------------


@pytest.mark.parametrize("change", ["another version", "same size, one byte"])
def test_a_replaced_archive_is_refused_and_the_prepared_copy_kept(
    change, tmp_path, monkeypatch, capsys
):
    src, root = tmp_path / "archives", tmp_path / "data"
    (archive,) = fake_archives("cub", src)
    listed_as(monkeypatch, tmp_path, [archive])
    assert main(_args(src, root)) == 0
    assert main(_args(src, root)) == 0  # the same archive again: fine, nothing redone
    before, info = tree(root), (root / "prepared.json").read_text()
    old_sha = hashlib.sha256(archive.read_bytes()).hexdigest()

    if change == "another version":
        _repack(archive, {"CUB_200_2011/attributes.txt": b"1 has_bill_shape::curved\n"})
    else:  # same size: only the hash tells
        data = bytearray(archive.read_bytes())
        data[len(data) // 2] ^= 0xFF
        archive.write_bytes(bytes(data))
    new_sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    capsys.readouterr()
    assert main(_args(src, root, "--accept-unlisted")) == 2
    line = _one_error_line(capsys)
    assert f"{archive} is not the archive {root} was prepared from" in line
    if change == "same size, one byte":
        assert f"SHA-256 {old_sha} when prepared, {new_sha} now" in line
    assert "new --root" in line
    assert tree(root) == before and (root / "prepared.json").read_text() == info

    if change == "another version":  # the advice works: a new root gets the new archive
        fresh = tmp_path / "fresh"
        assert main(_args(src, fresh, "--accept-unlisted")) == 0
        (record,) = json.loads((fresh / "prepared.json").read_text())["archives"]
        assert record["sha256"] == new_sha
        assert (fresh / "CUB_200_2011" / "attributes.txt").is_file()


# -- item 12: link chains --------------------------------------------------------------


def _link(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _tar(path: Path, members: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as t:
        first, data = _file("CUB_200_2011/images.txt", b"1 a")
        t.addfile(first, io.BytesIO(data))  # written first if anything is
        for m in members:
            info, data = m if isinstance(m, tuple) else (m, None)
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


@pytest.mark.parametrize(
    "members, refused",
    [
        # the chain: c1/c2 is root/.. once c1 -> . is followed
        ([_link("c1", "."), _link("c1/c2", ".."), _file("c1/c2/x")], "'c1/c2' is a link to '..'"),
        # lexically x/.. is the folder itself; through x -> . it is the folder's parent
        ([_link("x", "."), _link("l1", "x/.."), _file("l1/evil")], "'l1' is a link to 'x/..'"),
        # a link to a name that becomes a link later in the archive (d -> sub -> .)
        ([_link("d", "sub"), _link("sub", "."), _link("d/up", "..")],
         "'d/up' is a link to '..'"),
        # a loop: no filesystem resolves it, tarfile's filter would fail mid-extraction
        ([_link("a", "b"), _link("b", "a"), _file("a/x")], "'a/x' is a path through links that loop"),
    ],
)  # fmt: skip
def test_link_chains_leaving_the_folder_are_refused_before_anything_is_written(
    members, refused, tmp_path, monkeypatch, capsys
):
    src, root = tmp_path / "archives", tmp_path / "data"
    archive = _tar(src / "CUB_200_2011.tgz", members)
    listed_as(monkeypatch, tmp_path, [archive])
    assert main(_args(src, root)) == 2
    line = _one_error_line(capsys)
    assert f"member {refused}" in line
    assert "loop" in refused or f"member {refused}, outside the extraction folder" in line
    assert "refusing to extract anything" in line
    assert not root.exists() or not any(root.rglob("*"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "evil").exists()


def test_link_chains_that_stay_inside_pass_the_check_and_extract(tmp_path, monkeypatch):
    archive = _tar(
        tmp_path / "a.tgz",
        [
            _link("lnk", "CUB_200_2011"),
            _link("CUB_200_2011/alias", "../lnk/images.txt"),
            _link("c1", "."),
            _link("c1/c2", "CUB_200_2011/../lnk"),  # root/CUB_200_2011 via lnk: inside
            _file("c1/c2/via_links.txt", b"y"),
        ],
    )
    members = archives.check_members(archive)
    assert [m.name for m in members][-1] == "c1/c2/via_links.txt"
    # what the check allowed, tarfile's own data filter extracts too
    out = tmp_path / "out"
    with tarfile.open(archive) as t:
        t.extractall(out, filter="data")
    assert (out / "CUB_200_2011" / "via_links.txt").read_bytes() == b"y"


# -- item 13: expansion bound by the file's own size, and free disk -------------------------


def test_a_small_file_may_not_expand_to_what_the_official_archive_could(
    tmp_path, monkeypatch, capsys
):
    src, root = tmp_path / "archives", tmp_path / "data"
    (archive,) = fake_archives("cub", src)
    big = 24 << 20  # zeros: a few kB in the archive
    _repack(archive, {"CUB_200_2011/big.bin": bytes(big)})
    # the table says the official file is 1.15 GB: 50x that allowed anything before
    listed_as(monkeypatch, tmp_path, [archive], **{archive.name: {"size": 1_150_585_339}})
    size = archive.stat().st_size
    assert size < 1 << 20
    assert main(_args(src, root, "--accept-unlisted")) == 2
    line = _one_error_line(capsys)
    assert f"over 4x the file's own {size:,} bytes" in line and "--max-expansion N" in line
    assert not root.exists() or not any(root.rglob("*"))
    # the override named in the line prepares it
    assert main(_args(src, root, "--accept-unlisted", "--max-expansion", "1000")) == 0
    assert (root / "CUB_200_2011" / "big.bin").stat().st_size == big


def test_archives_that_cannot_fit_on_the_disk_are_refused_before_writing(
    tmp_path, monkeypatch, capsys
):
    src, root = tmp_path / "archives", tmp_path / "data"
    (archive,) = fake_archives("cub", src)
    listed_as(monkeypatch, tmp_path, [archive])
    real = shutil.disk_usage

    def nearly_full(path):
        return real(path)._replace(free=8192)  # the disk a user had: ~8 kB free

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    assert main(_args(src, root)) == 2
    line = _one_error_line(capsys)
    assert f"{root}: the archives extract to about" in line and "0.00 GB free" in line
    assert "choose a --root on another disk" in line
    assert not any(root.rglob("*"))
    monkeypatch.setattr(shutil, "disk_usage", real)
    assert main(_args(src, root)) == 0


# -- item 15: near misses --------------------------------------------------------------


@pytest.mark.parametrize(
    "near, says",
    [
        ("CUB_200_2011 (1).tgz", "found CUB_200_2011 (1).tgz: rename it to CUB_200_2011.tgz"),
        ("cub_200_2011.tgz.1", "found cub_200_2011.tgz.1: rename it to CUB_200_2011.tgz"),
        ("CUB_200_2011.tar", "found CUB_200_2011.tar, a .tar where the table has the hashes of "
         "CUB_200_2011.tgz: get CUB_200_2011.tgz itself, or rename it to CUB_200_2011.tgz and "
         "pass --accept-unlisted"),
        ("CUB_200_2011.tgz.part", "found CUB_200_2011.tgz.part, an unfinished download"),
        ("CUB_200_2011", "found the folder {src}/CUB_200_2011 (already extracted?)"),
        ("--archives is the file", "{src}/CUB_200_2011.tgz is a file: --archives names the "
         "folder that holds the archives"),
    ],
)  # fmt: skip
def test_a_missing_archive_names_the_near_miss_found_and_its_fix(
    near, says, tmp_path, monkeypatch, capsys
):
    src, root = tmp_path / "archives", tmp_path / "data"
    (archive,) = fake_archives("cub", tmp_path / "download")
    listed_as(monkeypatch, tmp_path, [archive])
    src.mkdir()
    given = src
    if near == "--archives is the file":
        shutil.copy(archive, src / archive.name)
        given = src / archive.name
    elif near == "CUB_200_2011":
        shutil.copytree(tmp_path / "download" / "cub_src" / "CUB_200_2011", src / near)
    elif near == "CUB_200_2011.tar":
        with tarfile.open(archive) as t, tarfile.open(src / near, "w") as out:
            for m in t:
                out.addfile(m, t.extractfile(m) if m.isfile() else None)
    else:
        shutil.copy(archive, src / near)
    assert main(_args(given, root)) == 2
    line = _one_error_line(capsys)
    assert "CUB_200_2011.tgz not found in" in line and says.format(src=src) in line
    assert not root.exists() or not any(root.rglob("*"))

    # each fix, as the line gives it, works
    capsys.readouterr()
    if near == "--archives is the file":
        assert main(_args(src, root)) == 0
    elif near == "CUB_200_2011":
        assert verify_main(["cub", str(src / near)]) == 0
    elif near == "CUB_200_2011.tar":
        (src / near).rename(src / "CUB_200_2011.tgz")
        assert main(_args(src, root)) == 2  # the hash is the .tgz's, not this file's
        assert main(_args(src, root, "--accept-unlisted")) == 0
    elif near == "CUB_200_2011.tgz.part":
        (src / near).rename(src / "CUB_200_2011.tgz")
        assert main(_args(src, root)) == 0
    else:
        (src / near).rename(src / "CUB_200_2011.tgz")
        assert main(_args(src, root)) == 0


def test_an_unrelated_file_is_not_named_as_a_near_miss(tmp_path, capsys):
    src = tmp_path / "archives"
    src.mkdir()
    (src / "CUB_200.tgz").write_bytes(b"x")
    (src / "Stanford_Online_Products.zip").write_bytes(b"x")
    assert main(_args(src, tmp_path / "data")) == 2
    line = _one_error_line(capsys)
    assert "; found" not in line and "CUB_200_2011.tgz not found in" in line


def test_prepare_raises_user_errors_not_tracebacks_for_link_chains(tmp_path, monkeypatch):
    src = tmp_path / "archives"
    archive = _tar(src / "CUB_200_2011.tgz", [_link("c1", "."), _link("c1/c2", "..")])
    listed_as(monkeypatch, tmp_path, [archive])
    with pytest.raises(UserError, match="'c1/c2' is a link to '..'"):
        prepare("cub", src, tmp_path / "data", progress=False)
