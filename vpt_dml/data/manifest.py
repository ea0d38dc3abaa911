"""The split manifest, `<data.root>/split.json`: which files, with which class, in which
split; and its SHA-256, the identity two results are compared by.

The hash is over the canonical form only (per split, sorted [relative path, class name,
size, content digest] rows; paths relative to data.root, posix): the same split of the same
files gives the same hash on any machine and whatever folder data.root is, and two copies
with the same file names but other pixels give two hashes (issue 28 item 3).

The content digest is BLAKE2b-128 of the file's bytes. Reading a whole dataset at every
run start would be slow on SOP or iNat, so digests are cached per file under its stat
identity (size, mtime, ctime, inode: rewriting a file changes its ctime, which no tool can
set back) in `~/.cache/vpt_dml/digests/` ($XDG_CACHE_HOME), one file per resolved data root;
nothing is written into the dataset folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from vpt_dml.data.records import RetrievalSplits

FILE = "split.json"
CONTENT = "size+blake2b-128"  # what each row's digest is; a split.json without it is older
CHUNK = 1 << 20

_memo: dict[tuple, str] = {}  # (absolute path, stat identity) -> digest, this process


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _cache_path(root: str) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vpt_dml"
    name = hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:16]
    return cache / "digests" / f"{name}.json"


def _load_cache(root: str) -> dict:
    try:
        data = json.loads(_cache_path(root).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_cache(root: str, cache: dict) -> None:
    path = _cache_path(root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, separators=(",", ":")))
        os.replace(tmp, path)  # concurrent ranks: the last whole file wins
    except OSError:
        pass  # no writable cache: the next run hashes again


def file_digests(paths: list[str], root: str) -> list[tuple[int, str]]:
    """(size, BLAKE2b-128 hex of the bytes) of each file; (-1, "missing") for a file that is
    not there (the check for missing files is the datamodule's, later)."""
    cache = _load_cache(root) if root else {}
    changed = False
    out = []
    for p in paths:
        absolute = os.path.abspath(p)
        try:
            st = os.stat(absolute)
        except OSError:
            out.append((-1, "missing"))
            continue
        key = _stat_key(st)
        memo = (absolute, tuple(key))
        rel = os.path.relpath(absolute, root) if root else absolute
        hit = cache.get(rel)
        if memo in _memo:
            digest = _memo[memo]
        elif isinstance(hit, list) and len(hit) == 2 and hit[0] == key:
            digest = hit[1]
        else:
            h = hashlib.blake2b(digest_size=16)
            try:
                with open(absolute, "rb") as f:
                    while chunk := f.read(CHUNK):
                        h.update(chunk)
            except OSError:
                out.append((st.st_size, "unreadable"))
                continue
            digest = h.hexdigest()
        _memo[memo] = digest
        if hit != [key, digest]:
            cache[rel] = [key, digest]
            changed = True
        out.append((st.st_size, digest))
    if changed and root:
        _save_cache(root, cache)
    return out


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
        digests = file_digests(list(records.paths), root)
        files = sorted(
            [
                Path(os.path.relpath(os.path.abspath(p), root)).as_posix(),
                records.class_name(label),
                size,
                digest,
            ]
            for p, label, (size, digest) in zip(records.paths, records.labels, digests)
        )
        parts[part] = {
            "classes": sorted({f[1] for f in files}),
            "files": files,
            "images": len(files),
        }
    return {"dataset": splits.name, "content": CONTENT, "splits": parts}


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
        body = json.loads(path.read_text())
        # an older split.json hashed names only: not this hash's kind, to be rewritten
        return body["sha256"] if body.get("content") == CONTENT else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
