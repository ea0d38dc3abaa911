"""From the official archives to a verified copy in the layout the loaders read.

    python -m vpt_dml.data.prepare NAME --archives DIR --root DIR [--download]
        [--decode] [--accept-unlisted] [--inshop-images img|img_highres]

checks each archive's size and hashes against vpt_dml/data/checksums.py, extracts it
safely into --root (resumable: finished archives are not redone; one replaced since is
refused, the old copy kept), runs the loader's own
verification, and writes <root>/split.json (the split manifest) and <root>/prepared.json
(the hashes seen). Exit 0: the copy matches the official split; 1: it differs (each
difference on its own line); 2: it cannot be prepared (one `error:` line).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vpt_dml.data import archives, cars
from vpt_dml.data.checksums import listed
from vpt_dml.data.manifest import write_manifest
from vpt_dml.data.registry import DATASETS, load_splits
from vpt_dml.data.verify import verify
from vpt_dml.errors import UserError

WHERE = 'README.md, "Getting the datasets", says where copies are found'
CARS_SOURCE = ".cars_source"


@dataclass(frozen=True)
class Layout:
    label: str
    files: tuple[str, ...]
    # file -> where it goes: "" extracts the archive into the root, a relative path copies it
    copy_to: dict
    into: str = ""  # the sources' folder under root ("" = root itself)
    finish: Callable[[Path], None] | None = None


def _cars_finish(read: Callable[[Path], tuple]) -> Callable[[Path], None]:
    def finish(root: Path) -> None:
        rows, names = read(root / CARS_SOURCE)
        cars.write_canonical(rows, names, root)
        shutil.rmtree(root / CARS_SOURCE)

    return finish


def layouts(name: str, inshop_images: str = "img") -> list[Layout]:
    if name == "cub":
        return [Layout("official", ("CUB_200_2011.tgz",), {})]
    if name == "sop":
        return [Layout("official", ("Stanford_Online_Products.zip",), {})]
    if name == "inat":
        splits = ("Inaturalist_train_set1.txt", "Inaturalist_test_set1.txt")
        return [Layout("official", ("train_val2018.tar.gz", *splits), {f: f for f in splits})]
    if name == "inshop":
        return [
            Layout(
                f"official ({inshop_images}/)",
                (f"{inshop_images}.zip", "list_eval_partition.txt"),
                {"list_eval_partition.txt": "Eval/list_eval_partition.txt"},
            )
        ]
    if name == "cars":
        return [
            Layout(
                "DML (car_ims + cars_annos.mat)",
                ("car_ims.tgz", "cars_annos.mat"),
                {"cars_annos.mat": "cars_annos.mat"},
                CARS_SOURCE,
                _cars_finish(cars.dml_layout_images),
            ),
            Layout(
                "classification (cars_train + cars_test + devkit + test labels, re-split by class)",
                (
                    "cars_train.tgz",
                    "cars_test.tgz",
                    "car_devkit.tgz",
                    "cars_test_annos_withlabels.mat",
                ),
                {"cars_test_annos_withlabels.mat": "cars_test_annos_withlabels.mat"},
                CARS_SOURCE,
                _cars_finish(cars.classification_layout_images),
            ),
        ]
    raise UserError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")


def choose_layout(
    name: str, options: list[Layout], src: Path, root: Path, download: bool
) -> Layout:
    def have(f: str) -> bool:
        return (src / f).is_file() or archives.done(root, f) is not None

    for layout in options:
        if all(have(f) for f in layout.files):
            return layout
    if download:
        for layout in options:
            if all(have(f) or listed(f).url for f in layout.files):
                return layout
    needs = " or ".join(f"{' + '.join(o.files)} ({o.label})" for o in options)
    missing = [f for f in options[0].files if not have(f)]
    hint = " (none has a public URL for --download)" if download else ""
    wanted = dict.fromkeys(f for o in options for f in o.files if not have(f))
    found = [line for f in wanted for line in near_misses(name, src, f)]
    if not src.is_dir():
        found.insert(0, f"{src} is {'a file' if src.exists() else 'missing'}: --archives names "
                     "the folder that holds the archives")  # fmt: skip
    found_text = "".join(f"; {line}" for line in found)
    raise UserError(
        f"{name}: {', '.join(missing)} not found in {src}{hint}: it needs {needs}{found_text}; "
        f"{WHERE}"
    )


_EXTS = (".tar.gz", ".tgz", ".tar", ".zip", ".gz", ".mat", ".txt")
_UNFINISHED = (".part", ".crdownload", ".download", ".partial")
# what browsers and download tools append to a second copy: " (1)", " copy", "-1", ".1"
_COPY = re.compile(r"(\s*\(\d+\)|[ _-]copy( \d+)?|-\d+)$")


def _stem(name: str) -> str:
    name = name.lower()
    for end in _UNFINISHED:
        name = name.removesuffix(end)
    name = re.sub(r"\.\d+$", "", name)  # wget's file.tgz.1
    for ext in _EXTS:
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return _COPY.sub("", name)


def _ext(name: str) -> str:
    return next((e for e in _EXTS if name.lower().endswith(e)), "")


def near_misses(name: str, src: Path, expected: str) -> list[str]:
    """Files or folders in src (or beside it) that are almost `expected`, each with its fix."""
    folders = [src] if src.is_dir() else [src.parent] if src.parent.is_dir() else []
    out = []
    for folder in folders:
        for entry in sorted(folder.iterdir()):
            if entry.name == expected or _stem(entry.name) != _stem(expected):
                continue
            if entry.is_dir():
                out.append(
                    f"found the folder {entry} (already extracted?): prepare needs the "
                    f"archive itself to check its hash, so put {expected} in {src}; or check "
                    f"the folder with python -m vpt_dml.data.verify {name} {entry} and set "
                    "data.root to it"
                )
            elif entry.name.lower().endswith(_UNFINISHED):
                out.append(
                    f"found {entry.name}, an unfinished download: finish it (--download "
                    f"resumes it where a URL is known) and name it {expected}"
                )
            elif _ext(entry.name) == _ext(expected) or _ext(entry.name) == "":
                out.append(f"found {entry.name}: rename it to {expected}")
            else:
                out.append(
                    f"found {entry.name}, a {_ext(entry.name)} where the table has the hashes of "
                    f"{expected}: get {expected} itself, or rename it to {expected} and pass "
                    "--accept-unlisted (its hash is then recorded, not checked)"
                )
    return out


def unchanged(path: Path, old: dict, root: Path, progress: bool) -> None:
    """Refuses, in one line, an archive that is no longer the one `root` was prepared from.

    Refused rather than re-extracted: runs may already have used this root (their records
    name its split hash), and files of the old archive that the new one lacks would stay;
    a new --root keeps both copies whole and costs the user one flag."""
    size, was = path.stat().st_size, old.get("size")
    if was is not None and size != was:  # no need to read it all
        what = f"{was:,} bytes when prepared, {size:,} now"
    else:
        seen = archives.file_hashes(path, progress).sha256
        if seen == old.get("sha256", seen):
            return
        what = f"SHA-256 {old['sha256']} when prepared, {seen} now"
    raise UserError(
        f"{path} is not the archive {root} was prepared from ({what}): the files there are "
        f"still the old archive's; to prepare the new one use a new --root (or delete {root} "
        "first), to keep the old copy put its archive back"
    )


def room_for(members: list[archives.Member], root: Path) -> None:
    """One line, before anything is written, when the extracted files cannot fit on root's
    disk (each file rounded up to a 4 KiB block: many small images)."""
    need = sum(-(-m.size // 4096) * 4096 + 4096 for m in members)
    free = shutil.disk_usage(root).free
    if need > free:
        raise UserError(
            f"{root}: the archives extract to about {need / 1e9:.2f} GB and its disk has "
            f"{free / 1e9:.2f} GB free; free some space there or choose a --root on another disk"
        )


def prepare(
    name: str,
    src: Path,
    root: Path,
    *,
    accept_unlisted: bool = False,
    download: bool = False,
    decode: bool = False,
    inshop_images: str = "img",
    progress: bool = True,
    after_member: Callable[[int], None] | None = None,
    max_expansion: float = archives.MAX_RATIO,
) -> list[str]:
    """Prepare the copy; returns the verification's problems (empty: official split)."""
    from vpt_dml.data.download import download as fetch

    src, root = Path(src).expanduser(), Path(root).expanduser()
    layout = choose_layout(name, layouts(name, inshop_images), src, root, download)
    root.mkdir(parents=True, exist_ok=True)
    # every archive is fetched, hashed and its members checked before any is extracted:
    # a refusal leaves --root as it was
    todo = []
    for file in layout.files:
        if (old := archives.done(root, file)) is not None:
            if (src / file).is_file():  # deleted after preparing: nothing to compare
                unchanged(src / file, old, root, progress)
            continue
        path, entry = src / file, listed(file)
        if not path.is_file():
            fetch(entry, path, progress)
        seen = archives.file_hashes(path, progress)
        ok = archives.check_listed(path, entry, seen, accept_unlisted)
        record = {
            "file": file, "size": seen.size, "md5": seen.md5, "sha256": seen.sha256,
            "checked": "matches the table" if ok else (
                "differs from the table: accepted with --accept-unlisted"
                if entry.published else "no published checksum: recorded as seen"
            ),
        }  # fmt: skip
        members = None if file in layout.copy_to else archives.check_members(path, max_expansion)
        todo.append((path, record, members))
    # an interrupted run's temp files are redone anyway: their space counts as free
    shutil.rmtree(root / archives.PARTIAL, ignore_errors=True)
    room_for([m for _, _, members in todo for m in members or ()], root)
    dest = root / layout.into
    for path, record, members in todo:
        if members is None:
            archives.copy_file(path, dest / layout.copy_to[path.name])
            archives.write_marker(root, path.name, record)
        else:
            archives.extract(path, root, record, members, progress, after_member, dest)
    records = [archives.done(root, file) for file in layout.files]
    if layout.finish is not None and archives.done(root, "finish") is None:
        layout.finish(root)
        archives.write_marker(root, "finish", {"layout": layout.label})
    shutil.rmtree(root / archives.PARTIAL, ignore_errors=True)

    options = {"images": inshop_images} if name == "inshop" else {}
    splits, official = load_splits(name, str(root), **options)
    problems = verify(splits, official, decode)
    split = write_manifest(root, splits)
    info = {
        "dataset": name,
        "layout": layout.label,
        "archives": records,
        "split_sha256": split["sha256"],
        "counts": splits.summary(),
        "problems": problems,
        **({"inshop_images": inshop_images} if name == "inshop" else {}),
    }
    (root / "prepared.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return problems


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vpt_dml.data.prepare", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--archives", required=True, type=Path, help="folder holding the archives")
    parser.add_argument("--root", required=True, type=Path, help="data.root to create")
    parser.add_argument(
        "--download", action="store_true", help="fetch missing archives that have a public URL"
    )
    parser.add_argument("--decode", action="store_true", help="also decode every image (slow)")
    parser.add_argument("--accept-unlisted", action="store_true",
                        help="prepare an archive whose hash differs from the table, recording it")  # fmt: skip
    parser.add_argument("--inshop-images", choices=["img", "img_highres"], default="img")
    parser.add_argument("--max-expansion", type=_positive, default=archives.MAX_RATIO, metavar="N",
                        help="refuse an archive whose members add up to more than N times "
                        "its own size (default %(default)g: images barely compress)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        problems = prepare(
            args.dataset, args.archives, args.root,
            accept_unlisted=args.accept_unlisted, download=args.download, decode=args.decode,
            inshop_images=args.inshop_images, progress=not args.no_progress,
            max_expansion=args.max_expansion,
        )  # fmt: skip
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in problems:
        print(line)
    print(f"{args.dataset} prepared in {args.root} (split.json, prepared.json)")
    print("OK: matches the official split" if not problems else f"{len(problems)} problem(s) found")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
