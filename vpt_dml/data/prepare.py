"""From the official archives to a verified copy in the layout the loaders read.

    python -m vpt_dml.data.prepare NAME --archives DIR --root DIR [--download]
        [--decode] [--accept-unlisted] [--inshop-images img|img_highres]

checks each archive's size and hashes against vpt_dml/data/checksums.py, extracts it
safely into --root (resumable: finished archives are not redone), runs the loader's own
verification, and writes <root>/split.json (the split manifest) and <root>/prepared.json
(the hashes seen). Exit 0: the copy matches the official split; 1: it differs (each
difference on its own line); 2: it cannot be prepared (one `error:` line).
"""

from __future__ import annotations

import argparse
import json
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
    raise UserError(
        f"{name}: {', '.join(missing)} not found in {src}{hint}: it needs {needs}; {WHERE}"
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
        if archives.done(root, file) is not None:
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
        members = None if file in layout.copy_to else archives.check_members(path, entry.size)
        todo.append((path, record, members))
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
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        problems = prepare(
            args.dataset, args.archives, args.root,
            accept_unlisted=args.accept_unlisted, download=args.download, decode=args.decode,
            inshop_images=args.inshop_images, progress=not args.no_progress,
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
