"""Integrity checks of a dataset copy, at start-up and on demand.

    python -m vpt_dml.data.verify DATASET ROOT [--decode] [--duplicates]

checks the layout, the split counts against the official ones, that every listed file
exists, with --decode that every image decodes, and with --duplicates reports
byte-identical images (by content hash) within and across splits: counts and examples,
a train/test duplicate named as a leak; nothing is removed, and duplicates alone do not
change the exit status. Exit 0 when the copy is exact, 1 when
it differs (each difference on its own line), 2 when it cannot be read at all.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections import Counter

from PIL import Image

from vpt_dml.data.images import conversion, to_rgb
from vpt_dml.data.records import RetrievalSplits
from vpt_dml.data.registry import DATASETS, count_mismatches, load_splits
from vpt_dml.errors import UserError


def missing_files(splits: RetrievalSplits) -> list[str]:
    """Listed files that do not exist (one os.stat each: cheap enough for start-up)."""
    missing = []
    for _, records in splits.all_records():
        for path in records.paths:
            try:
                os.stat(path)
            except OSError:
                missing.append(path)
    return missing


def undecodable_files(
    splits: RetrievalSplits, log_every: int = 0, converted: Counter | None = None
) -> list[tuple[str, str]]:
    """(path, reason) for every image that PIL cannot fully decode; `converted` counts
    what data/images.py converts to reach displayed RGB (mode, transparency, EXIF)."""
    bad = []
    done = 0
    for _, records in splits.all_records():
        for path in records.paths:
            try:
                with Image.open(path) as im:
                    kind = conversion(im)
                    im.load()
                    to_rgb(im)  # the conversion training does must work too
                if kind and converted is not None:
                    converted[kind] += 1
            except Exception as e:  # noqa: BLE001 - any decoder failure is a finding
                bad.append((path, str(e).splitlines()[0] if str(e) else type(e).__name__))
            done += 1
            if log_every and done % log_every == 0:
                print(f"  decoded {done} images, {len(bad)} broken", file=sys.stderr)
    return bad


def duplicate_groups(splits: RetrievalSplits) -> list[list[tuple[str, str]]]:
    """Groups of 2+ listed files with the same bytes: [(split, path), ...], largest first.
    A file listed twice (In-Shop lists none twice) counts once per listing."""
    by_hash: dict[str, list[tuple[str, str]]] = {}
    for part, records in splits.all_records():
        for path in records.paths:
            digest = hashlib.sha256()
            try:
                with open(path, "rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
            except OSError:
                continue  # reported as missing
            by_hash.setdefault(digest.hexdigest(), []).append((part, path))
    groups = [sorted(g) for g in by_hash.values() if len(g) > 1]
    return sorted(groups, key=lambda g: (-len(g), g))


def duplicate_report(splits: RetrievalSplits, examples: int = 5) -> list[str]:
    groups = duplicate_groups(splits)
    if not groups:
        return ["duplicates: none (every listed image has its own bytes)"]
    kinds: dict[str, list[list[tuple[str, str]]]] = {}
    for g in groups:
        parts = sorted({p for p, _ in g})
        leak = "train" in parts and len(parts) > 1
        kind = "within " + parts[0] if len(parts) == 1 else "across " + "/".join(parts)
        kinds.setdefault(("LEAK: " if leak else "") + kind, []).append(g)
    lines = [f"duplicates: {len(groups)} group(s) of byte-identical images, "
             f"{sum(len(g) for g in groups)} files (never removed)"]  # fmt: skip
    for kind, gs in sorted(kinds.items()):
        lines.append(f"  {kind}: {len(gs)} group(s)" + (
            " - a test image is also a training image" if kind.startswith("LEAK") else ""))  # fmt: skip
        for g in gs[:examples]:
            lines.append("    " + " = ".join(f"{p}:{path}" for p, path in g))
    return lines


def verify(
    splits: RetrievalSplits,
    official: dict[str, int],
    decode: bool = False,
    converted: Counter | None = None,
) -> list[str]:
    """Every problem found, one line each (empty: the copy matches the official split)."""
    problems = [f"count {p}" for p in count_mismatches(splits.summary(), official)]
    missing = missing_files(splits)
    problems += [f"missing file: {p}" for p in missing]
    if decode:
        present = set(missing)
        problems += [
            f"cannot decode: {p} ({why})"
            for p, why in undecodable_files(splits, 5000, converted)
            if p not in present
        ]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vpt_dml.data.verify", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("root", help="the folder data.root would point at")
    parser.add_argument(
        "--decode", action="store_true", help="also open and decode every image (slow)"
    )
    parser.add_argument(
        "--duplicates", action="store_true",
        help="also report byte-identical images within and across splits (reads every file)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        splits, official = load_splits(args.dataset, args.root)
        print(f"{args.dataset} at {args.root}: {splits.summary()}")
        converted: Counter = Counter()
        problems = verify(splits, official, args.decode, converted)
        duplicates = duplicate_report(splits) if args.duplicates else []
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in problems + duplicates:
        print(line)
    if converted:  # not problems: what reaches the model differs from a plain RGB read
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(converted.items()))
        print(f"converted to displayed RGB: {sum(converted.values())} image(s) ({kinds})")
    print("OK: matches the official split" if not problems else f"{len(problems)} problem(s) found")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
