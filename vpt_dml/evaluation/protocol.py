"""The protocol stamp: a short hash of what makes two runs' numbers comparable.

metrics.json `protocol` = {"stamp", "split_sha256", "image_resolution", "decode",
"selection", "map_at_r", "embedding", "ks"}. Two runs with one stamp were evaluated on the
same test split (same images, same labels, same query / gallery roles), at one input
resolution and decode path, with the best epoch chosen on the same split, and with the
same metric definitions; `vpt_dml.report` only ranks rows of one stamp together.

The split hash is the data manifest's (`provenance.dataset.split_sha256`, which sees each
file's size and content digest: data/manifest.py) when the run recorded one, else the
SHA-256 of the sorted (path relative to the dataset root, label, role, size, digest) rows
of the evaluated test split. When `data.skip_broken=true` left test images out, the hash
is of the images actually evaluated (the split's hash and the skipped files), so such a
run is never ranked or paired beside a run of the whole split. `data_root` (not a stamp
field) is the resolved dataset folder: `report` groups on it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from vpt_dml.data.manifest import file_digests

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
    items = []
    for records, role in ((query, "query"), (gallery, "gallery")):
        if records is None:
            continue
        digests = file_digests(list(records.paths), root)
        items += [(_relative(p, root), int(lbl), role, size, digest)
                  for p, lbl, (size, digest) in zip(records.paths, records.labels, digests)]  # fmt: skip
    text = "\n".join("\t".join(map(str, item)) for item in sorted(items))
    return hashlib.sha256(text.encode()).hexdigest()


def _skipped_test_images(dm) -> list[str]:
    """Test-split images data.skip_broken left out, over every rank (each rank only saw
    its shard's)."""
    test_set = getattr(dm, "test_set", None)
    mine = test_set.skipped_paths() if test_set is not None else []
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        mine = [p for paths in every for p in paths or []]
    return sorted(set(mine))


def evaluated_split_hash(split_hash: str, skipped: list[str], root: str) -> str:
    """The hash of the images actually evaluated: the split's, unless some were skipped."""
    if not skipped:
        return split_hash
    text = "\n".join([split_hash, "skipped", *sorted(_relative(p, root) for p in skipped)])
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
    skipped = _skipped_test_images(dm)
    split_hash = evaluated_split_hash(split_hash, skipped, str(dm.root))
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
    block = {"stamp": stamp_of(fields), **fields}
    root = getattr(dm, "root", None)
    block["data_root"] = os.path.realpath(os.path.expanduser(str(root))) if root else None
    if skipped:
        block["skipped_test_images"] = len(skipped)
    return block


def differing_fields(protocols: list[dict]) -> list[str]:
    """The fields in which the given protocol blocks differ."""
    return [f for f in FIELDS if len({json.dumps(p.get(f), sort_keys=True) for p in protocols}) > 1]
