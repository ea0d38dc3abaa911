"""Archives in, files out: streamed hashing, and extraction that refuses unsafe members
before anything is written and that resumes after an interruption.

Extraction of one archive goes to `<root>/.partial/<archive>/`, then each file is moved
into place (a rename: same filesystem) and `<root>/.prepared/<archive>.json` is written
last. A rerun skips archives with that marker, and starts an interrupted one again from a
fresh temp folder, so the final tree is the same as an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from vpt_dml.data.checksums import Listed
from vpt_dml.errors import ArchiveError

BLOCK = 4 << 20
# a member list expanding beyond this multiple of the archive file's own size is a bomb,
# not images: JPEG/PNG in tar.gz or zip expand ~1.0-1.1x (CUB 1.15 GB -> 1.2 GB); 4x leaves
# room for metadata and less compressed images. --max-expansion overrides it.
MAX_RATIO = 4.0
# tiny archives (split files, tests) may always write this much
MIN_ALLOWANCE = 16 << 20
MARKERS = ".prepared"
PARTIAL = ".partial"


@dataclass(frozen=True)
class Hashes:
    size: int
    md5: str
    sha256: str


def file_hashes(path: Path, progress: bool = True) -> Hashes:
    """MD5 and SHA-256 in one streamed pass (multi-GB archives never held in memory)."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    size = path.stat().st_size
    with (
        path.open("rb") as f,
        tqdm(
            total=size, unit="B", unit_scale=True, desc=f"hash {path.name}", disable=not progress
        ) as bar,
    ):
        while block := f.read(BLOCK):
            md5.update(block)
            sha.update(block)
            bar.update(len(block))
    return Hashes(size, md5.hexdigest(), sha.hexdigest())


def check_listed(path: Path, entry: Listed, seen: Hashes, accept_unlisted: bool) -> bool:
    """True when the table publishes a value and every published one matches; raises the
    one-line refusal when one differs (unless accept_unlisted)."""
    for what, want, got in (
        ("size", entry.size, seen.size),
        ("MD5", entry.md5, seen.md5),
        ("SHA-256", entry.sha256, seen.sha256),
    ):
        if want is not None and want != got and not accept_unlisted:
            raise ArchiveError(
                f"{path}: {what} expected {want}, found {got}: the file is damaged, truncated or "
                'another version; download it again (README, "Getting the datasets"), or pass '
                "--accept-unlisted to prepare it anyway and record the hash seen"
            )
    return entry.published and all(
        want is None or want == got
        for want, got in (
            (entry.size, seen.size),
            (entry.md5, seen.md5),
            (entry.sha256, seen.sha256),
        )
    )


# -- member checks ---------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    name: str  # posix path inside the archive
    size: int
    kind: str  # file | dir | symlink | hardlink | device
    target: str = ""


def _members(archive: Path) -> list[Member]:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            out = []
            for info in z.infolist():
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    out.append(Member(info.filename, 0, "symlink", z.read(info).decode()))
                elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
                    out.append(Member(info.filename, 0, "device"))
                else:
                    kind = "dir" if info.is_dir() else "file"
                    out.append(Member(info.filename, info.file_size, kind))
            return out
    try:
        with tarfile.open(archive) as t:
            out = []
            for info in t:
                if info.issym():
                    out.append(Member(info.name, 0, "symlink", info.linkname))
                elif info.islnk():
                    out.append(Member(info.name, 0, "hardlink", info.linkname))
                elif info.isdev():
                    out.append(Member(info.name, 0, "device"))
                else:
                    out.append(Member(info.name, info.size, "dir" if info.isdir() else "file"))
            return out
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ArchiveError(
            f"{archive}: not a readable tar or zip archive ({e}); download it again"
        ) from None


def _inside(path: str) -> bool:
    p = PurePosixPath(path.replace("\\", "/"))
    return not p.is_absolute() and ".." not in p.parts and not (p.parts and ":" in p.parts[0])


class LinkEscape(Exception):
    """A path that, following the archive's own links, leaves the extraction folder."""


def _resolve(path: str, links: dict[str, str], follow_last: bool = True) -> tuple[str, ...]:
    """Where `path` lands inside the extraction folder once the archive's links written so
    far (`links`: member name -> target) are followed, as the filesystem would; raises
    LinkEscape when it leaves the folder (or loops: the kernel would refuse it too)."""
    todo = [p for p in reversed(PurePosixPath(path.replace("\\", "/")).parts)]
    if todo and todo[-1] == "/":
        raise LinkEscape
    out: list[str] = []
    hops = 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                raise LinkEscape
            out.pop()
            continue
        key = "/".join([*out, part])
        if key in links and (todo or follow_last):
            hops += 1
            target = links[key]
            if target.startswith("/"):
                raise LinkEscape
            if hops > 40:
                raise LinkEscape("a path through links that loop")
            # the target is relative to the link's folder (out, unchanged)
            todo.extend(reversed(PurePosixPath(target).parts))
        else:
            out.append(part)
    return tuple(out)


def _link_escape(m: Member, links: dict[str, str]) -> str:
    """Why m (in archive order, after the members before it) lands, or points, outside the
    folder through a chain of the archive's links (c1 -> ., c1/c2 -> ..); "" when it does not."""
    try:
        if m.kind == "symlink":
            folder = _resolve(str(PurePosixPath(m.name).parent), links)
            _resolve("/".join([*folder, m.target]), links)
        elif m.kind == "hardlink":
            _resolve(m.target, links)
            _resolve(m.name, links, follow_last=False)
        else:
            # a file written through a link in its path (or at its name) lands at the target
            _resolve(m.name, links)
    except LinkEscape as e:
        return str(e) or "outside"
    return ""


def check_members(archive: Path, max_ratio: float = MAX_RATIO) -> list[Member]:
    """Every member, or one line refusing the first unsafe one (nothing written yet)."""
    members = _members(archive)
    links: dict[str, str] = {}
    for m in members:
        why = None
        if not _inside(m.name):
            absolute = m.name.startswith(("/", "\\")) or ":" in m.name.split("/")[0]
            why = "an absolute path" if absolute else "a '..' path"
        elif m.kind == "device":
            why = "a device or FIFO file"
        elif (escape := _link_escape(m, links)) not in ("", "outside"):
            why = escape  # a loop
        elif m.kind == "symlink" and (m.target.startswith("/") or escape):
            why = f"a link to {m.target!r}, outside the extraction folder"
        elif m.kind == "hardlink" and (not _inside(m.target) or escape):
            why = f"a hard link to {m.target!r}, outside the extraction folder"
        elif m.kind in ("file", "dir") and escape:
            why = "a path through the archive's links to outside the extraction folder"
        if why:
            raise ArchiveError(
                f"{archive}: member {m.name!r} is {why}; refusing to extract anything from it "
                "(the archive is not the official one: download it again)"
            )
        # the simulated tree: later members see the links written before them
        key = "/".join(_resolve(m.name, links, follow_last=False))
        if m.kind == "symlink":
            links[key] = m.target
        else:
            links.pop(key, None)
    total = sum(m.size for m in members)
    # bound by the file's own size, never the table's: a small file claiming to be the
    # official archive must not write what the official one may
    size = archive.stat().st_size
    allowed = max(int(size * max_ratio), MIN_ALLOWANCE)
    if total > allowed:
        raise ArchiveError(
            f"{archive}: its members add up to {total:,} bytes, over {max_ratio:g}x the file's "
            f"own {size:,} bytes (the bound for images in an archive: they barely compress); "
            "refusing to extract it: download the archive again, or pass --max-expansion N "
            "if this copy is known to expand more"
        )
    return members


# -- extraction ------------------------------------------------------------------------


def marker(root: Path, archive_name: str) -> Path:
    return root / MARKERS / f"{archive_name}.json"


def done(root: Path, archive_name: str) -> dict | None:
    m = marker(root, archive_name)
    return json.loads(m.read_text()) if m.is_file() else None


def _iter_extract(archive: Path, dest: Path) -> Iterator[str]:
    """Write each member under dest (already checked), yielding its name as it lands."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                z.extract(info, dest)
                yield info.filename
        return
    with tarfile.open(archive) as t:
        for info in t:
            # the data filter checks again what check_members refused (defence in depth)
            t.extract(info, dest, filter="data")
            yield info.name


def extract(
    archive: Path,
    root: Path,
    record: dict,
    members: list[Member],
    progress: bool = True,
    after_member: Callable[[int], None] | None = None,
    dest: Path | None = None,
) -> None:
    """Extract a checked archive into `dest` (default root), resumably; the temp folder and
    the marker (holding `record`) live in root. `after_member(n)` is called after the n-th
    member is written (tests interrupt here)."""
    tmp = root / PARTIAL / archive.name
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted run: start this archive again
    tmp.mkdir(parents=True)
    total = sum(m.size for m in members)
    with tqdm(
        total=total, unit="B", unit_scale=True, desc=f"extract {archive.name}", disable=not progress
    ) as bar:
        sizes = {m.name: m.size for m in members}
        for n, name in enumerate(_iter_extract(archive, tmp), 1):
            bar.update(sizes.get(name, 0))
            if after_member is not None:
                after_member(n)
    move_tree(tmp, dest or root)
    shutil.rmtree(tmp)
    write_marker(root, archive.name, record)


def move_tree(src: Path, dest: Path) -> None:
    """Move every file of src to the same relative place under dest, replacing what is there."""
    for folder, dirs, files in os.walk(src):
        rel = Path(folder).relative_to(src)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            os.replace(Path(folder) / f, dest / rel / f)
        for d in list(dirs):
            if (Path(folder) / d).is_symlink():
                os.replace(Path(folder) / d, dest / rel / d)
                dirs.remove(d)


def write_marker(root: Path, name: str, record: dict) -> None:
    m = marker(root, name)
    m.parent.mkdir(parents=True, exist_ok=True)
    tmp = m.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, m)


def copy_file(src: Path, dest: Path) -> None:
    """A plain file (.mat, .txt) put in place atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
