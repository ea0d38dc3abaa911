"""The split manifest, `<data.root>/split.json`: which files, with which class, in which
split; and its SHA-256, the identity two results are compared by.

The hash is over the canonical form only (per split, sorted [relative path, class name]
pairs; paths relative to data.root, posix): the same split of the same files gives the
same hash on any machine and whatever folder data.root is.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from vpt_dml.data.records import RetrievalSplits

FILE = "split.json"


def _root(splits: RetrievalSplits) -> str:
    root = splits.info.get("root")
    if root:
        return os.path.abspath(os.path.expanduser(root))
    paths = [p for _, r in splits.all_records() for p in r.paths]
    return os.path.commonpath([os.path.abspath(p) for p in paths]) if paths else ""


def canonical(splits: RetrievalSplits) -> dict:
    root = _root(splits)
    parts = {}
    for part, records in splits.all_records():
        files = sorted(
            [
                Path(os.path.relpath(os.path.abspath(p), root)).as_posix(),
                records.class_name(label),
            ]
            for p, label in zip(records.paths, records.labels)
        )
        parts[part] = {
            "classes": sorted({c for _, c in files}),
            "files": files,
            "images": len(files),
        }
    return {"dataset": splits.name, "splits": parts}


def _digest(body: dict) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def split_sha256(splits: RetrievalSplits) -> str:
    """SHA-256 of the canonical manifest (the value split.json and metrics.json carry)."""
    return _digest(canonical(splits))


def manifest(splits: RetrievalSplits) -> dict:
    body = canonical(splits)
    counts = {
        part: {"images": s["images"], "classes": len(s["classes"])}
        for part, s in body["splits"].items()
    }
    return {"sha256": _digest(body), "counts": counts, **body}


def write_manifest(root: str | Path, splits: RetrievalSplits) -> dict:
    """Write <root>/split.json atomically; returns it."""
    out = manifest(splits)
    path = Path(root).expanduser() / FILE
    tmp = path.with_name(FILE + ".tmp")
    tmp.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return out


def read_sha256(root: str | Path) -> str | None:
    path = Path(root).expanduser() / FILE
    try:
        return json.loads(path.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
