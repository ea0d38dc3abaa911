"""The protocol stamp: a short hash of what makes two runs' numbers comparable.

metrics.json `protocol` = {"stamp", "split_sha256", "image_resolution", "decode",
"selection", "map_at_r", "embedding", "ks"}. Two runs with one stamp were evaluated on the
same test split (same images, same labels, same query / gallery roles), at one input
resolution and decode path, with the best epoch chosen on the same split, and with the
same metric definitions; `vpt_dml.report` only ranks rows of one stamp together.

The split hash is the data manifest's (`provenance.dataset.split_sha256`) when the run
recorded one, else the SHA-256 of the sorted (path relative to the dataset root, label,
role) triples of the evaluated test split.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MAP_AT_R = (
    "map@r: AP over the top R, R = same-class gallery items (query excluded), lone queries "
    "left out; map@r_vptsp: the reference's variant (R + 1 without a gallery)"
)
EMBEDDING = "cosine: float64 L2-normalised rows, exact ranks, ties by lower gallery index"
FIELDS = ("split_sha256", "image_resolution", "decode", "selection", "map_at_r", "embedding", "ks")
STAMP_CHARS = 12


def _relative(path: str, root: str) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()


def records_sha256(query, gallery=None, root: str = "") -> str:
    """SHA-256 of the sorted (relative path, label, role) of an evaluation split;
    `query` / `gallery`: ImageRecords-like (paths, labels)."""
    items = [(_relative(p, root), int(lbl), "query") for p, lbl in zip(query.paths, query.labels)]
    if gallery is not None:
        items += [(_relative(p, root), int(lbl), "gallery")
                  for p, lbl in zip(gallery.paths, gallery.labels)]  # fmt: skip
    text = "\n".join(f"{p}\t{lbl}\t{role}" for p, lbl, role in sorted(items))
    return hashlib.sha256(text.encode()).hexdigest()


def stamp_of(fields: dict) -> str:
    """Short hash of the protocol fields (their order does not matter)."""
    canonical = json.dumps({k: fields.get(k) for k in FIELDS}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:STAMP_CHARS]


def protocol(dm, result: dict) -> dict:
    """The protocol block of a finished run's metrics.json (`dm`: its datamodule)."""
    dataset = (result.get("provenance") or {}).get("dataset") or {}
    split_hash = dataset.get("split_sha256")
    if not split_hash:
        splits = dm.load()
        split_hash = records_sha256(splits.test, splits.gallery, str(dm.root))
    decode = dataset.get("decode") or (
        "fast" if getattr(dm, "fast_decode", True) else "torchvision"
    )
    fields = {
        "split_sha256": split_hash,
        "image_resolution": getattr(dm, "image_size", None),
        "decode": decode,
        "selection": result.get("selection"),
        "map_at_r": MAP_AT_R,
        "embedding": EMBEDDING,
        "ks": [int(k) for k in dm.recall_ks],
    }
    return {"stamp": stamp_of(fields), **fields}


def differing_fields(protocols: list[dict]) -> list[str]:
    """The fields in which the given protocol blocks differ."""
    return [f for f in FIELDS if len({json.dumps(p.get(f), sort_keys=True) for p in protocols}) > 1]
