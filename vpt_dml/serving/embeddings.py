"""The library behind `python -m vpt_dml.embed WEIGHTS IMAGE_DIR OUT`: embeddings of a folder of images.
(the command itself, its arguments and messages: vpt_dml/embed.py).

Writes into OUT:
  embeddings.npy  float32, one L2-normalised row per image
  files.txt       the image paths relative to IMAGE_DIR, in row order
  embed.json      the image folder (absolute), the model's fingerprint, counts
  skipped.txt     with --skip-broken: the files that could not be decoded (path, reason)
WEIGHTS is a file written by `python -m vpt_dml.export`; images are preprocessed as at
test time (resize, center crop). Work is saved in chunks (OUT/chunks/) as it goes: an
interrupted run, rerun with the same arguments, resumes after the last finished chunk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vpt_dml.data.dataset import UndecodableImage, load_transformed
from vpt_dml.data.transforms import build_transforms
from vpt_dml.errors import UserError
from vpt_dml.serving.exported import ExportedModel, read_export, tensor_digest

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
FORMAT = "vpt_dml.embed/1"
EMBEDDINGS = "embeddings.npy"
FILE_LIST = "files.txt"
META = "embed.json"
SKIPPED = "skipped.txt"
CHUNKS = "chunks"
SKIP_FLAG_HINT = "remove or replace the file, or pass --skip-broken to leave it out"


def list_images(root: Path) -> list[Path]:
    """Image files under `root` (recursively, sorted), or `root` itself if it is one."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise UserError(f"{root} does not exist; give a folder of images (or one image file)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    return files


def image_root(path: Path) -> Path:
    """The folder that file paths are written relative to (absolute; links kept as links:
    a folder of symlinks to a dataset lists the links' names, not their targets)."""
    path = Path(os.path.abspath(path))
    return path if path.is_dir() else path.parent


def relative_name(file: Path | str, root: Path) -> str:
    return str(Path(os.path.abspath(file)).relative_to(root))


def check_listable(names: list[str], root: Path) -> None:
    """files.txt holds one name per line (UTF-8): refuse a name that cannot round-trip
    (a line break of any kind splits it into two rows' names; undecodable bytes)."""
    bad = []
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            bad.append((name, "is not valid UTF-8"))
            continue
        if name.splitlines() != [name]:
            bad.append((name, "holds a line break"))
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        name, why = bad[0]
        raise UserError(
            f"the file name {name!r} under {root} {why}{more}; {FILE_LIST} lists one name "
            "per line, so its rows would not match the embeddings: rename the file"
        )


def model_fingerprint(weights: Path) -> dict:
    """What identifies an exported model: its backbone fingerprint and its tuned tensors."""
    tensors, meta = read_export(weights)
    out = {
        "backbone": json.loads(meta["fingerprint"]),
        "tuned_sha256": tensor_digest(tensors),
    }
    out["id"] = hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest()
    return out


@dataclass
class Embedded:
    """Rows of the decodable files; `kept` indexes into the files given, in row order."""

    embeddings: np.ndarray
    kept: list[int]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


@torch.no_grad()
def embed_files(
    model: ExportedModel,
    files: Sequence[Path],
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "embedding",
    skip_broken: bool = False,
    hint: str = SKIP_FLAG_HINT,
) -> Embedded:
    """Embed `files`; an undecodable one is skipped (skip_broken) or ends it, naming `hint`."""
    pre = model.preprocessing
    transform = build_transforms(
        pre["image_size"], tuple(pre["mean"]), tuple(pre["std"]), train=False
    )
    embedder = model.embedder.to(device)
    rows, kept, skipped = [], [], []
    with tqdm(total=len(files), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(files), batch_size):
            images = []
            for i in range(start, min(start + batch_size, len(files))):
                try:
                    images.append(load_transformed(str(files[i]), transform, hint))
                    kept.append(i)
                except UndecodableImage as e:
                    if not skip_broken:
                        raise
                    skipped.append((Path(files[i]), e.reason))
            if images:
                rows.append(embedder(torch.stack(images).to(device)).float().cpu())
            bar.update(min(batch_size, len(files) - start))
    emb = torch.cat(rows).numpy() if rows else np.zeros((0, 0), dtype=np.float32)
    return Embedded(emb, kept, skipped)


# -- chunked, resumable embedding of a folder ------------------------------------------
def _plan(fingerprint: dict, root: Path, names: list[str], chunk_size: int) -> dict:
    """What a chunk's rows depend on: resumed chunks must come from the same plan."""
    files_sha = hashlib.sha256("\n".join(names).encode()).hexdigest()
    return {
        "format": FORMAT,
        "model_id": fingerprint["id"],
        "image_root": str(root),
        "files_sha256": files_sha,
        "chunk_size": chunk_size,
    }


def _save_atomic(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # a chunk file is either whole or absent


def _load_chunk(path: Path, skip_broken: bool) -> dict | None:
    """A finished chunk, or None when it must be computed (again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            chunk = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):
        return None  # a damaged chunk is recomputed
    if len(chunk["skipped"]) and not skip_broken:
        return None  # made with --skip-broken: without it the bad file must stop the run
    return chunk


def embed_folder(
    model: ExportedModel,
    fingerprint: dict,
    weights: Path,
    image_dir: Path,
    out: Path,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
    skip_broken: bool = False,
    chunk_size: int = 1024,
) -> dict:
    """Embed every image under `image_dir` into `out` (see the module docstring); returns
    embed.json's content. Finished chunks of an earlier run with the same plan are reused."""
    if chunk_size < 1:
        raise UserError(f"--chunk-size {chunk_size} must be at least 1")
    files = list_images(image_dir)
    root = image_root(image_dir)
    names = [relative_name(f, root) for f in files]
    check_listable(names, root)  # before any work: files.txt must pair with the rows
    plan = _plan(fingerprint, root, names, chunk_size)
    chunk_dir = out / CHUNKS
    meta_path = out / META
    if meta_path.is_file() and (out / EMBEDDINGS).is_file():
        old = json.loads(meta_path.read_text())
        if old.get("plan") == plan and (skip_broken or not old.get("skipped")):
            return old  # finished before with the same model and files
    if chunk_dir.is_dir():
        try:
            same = json.loads((chunk_dir / "plan.json").read_text()) == plan
        except (OSError, ValueError):
            same = False
        if not same:  # another model, folder or chunk size: nothing there is reusable
            shutil.rmtree(chunk_dir)
    chunk_dir.mkdir(parents=True, exist_ok=True)
    (chunk_dir / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")

    n_chunks = (len(files) + chunk_size - 1) // chunk_size
    chunks = []
    for c in range(n_chunks):
        path = chunk_dir / f"chunk_{c:05d}.npz"
        chunk = _load_chunk(path, skip_broken)
        if chunk is None:
            lo = c * chunk_size
            part = files[lo : lo + chunk_size]
            try:
                done = embed_files(
                    model,
                    part,
                    batch_size,
                    device,
                    progress,
                    f"chunk {c + 1}/{n_chunks}",
                    skip_broken,
                )
            except UndecodableImage as e:
                kept = f" ({c} of {n_chunks} chunks are saved; rerun to resume)" if c else ""
                raise UserError(f"{e}{kept}") from None
            chunk = {
                "embeddings": done.embeddings.astype(np.float32),
                "kept": np.asarray(done.kept, dtype=np.int64) + lo,
                "skipped": np.asarray([str(f) for f, _ in done.skipped], dtype=str),
                "reasons": np.asarray([r for _, r in done.skipped], dtype=str),
            }
            _save_atomic(path, **chunk)
        chunks.append(chunk)

    rows = [ch["embeddings"] for ch in chunks if len(ch["kept"])]
    if not rows:
        raise UserError(f"no image under {image_dir} could be decoded; see {out / SKIPPED}")
    emb = np.concatenate(rows)
    kept = np.concatenate([ch["kept"] for ch in chunks])
    skipped = [
        (relative_name(f, root), str(r))
        for ch in chunks
        for f, r in zip(ch["skipped"], ch["reasons"])
    ]
    meta = {
        "format": FORMAT,
        "image_root": str(root),
        "count": int(len(emb)),
        "dim": int(emb.shape[1]),
        "skipped": len(skipped),
        "model": {"file": str(Path(weights).resolve()), "fingerprint": fingerprint},
        "plan": plan,
    }
    meta_path.unlink(missing_ok=True)  # never a new embeddings.npy beside an old model's meta
    np.save(out / EMBEDDINGS, emb)
    (out / FILE_LIST).write_text("".join(f"{names[i]}\n" for i in kept))
    if skipped:
        (out / SKIPPED).write_text("".join(f"{p}\t{r}\n" for p, r in skipped))
    else:
        (out / SKIPPED).unlink(missing_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(chunk_dir)
    return meta


# -- reading an embed output -----------------------------------------------------------
@dataclass
class Gallery:
    embeddings: np.ndarray
    paths: list[Path]
    meta: dict


def read_embeddings(folder: Path) -> Gallery:
    """An embed output folder, its rows paired with the real image paths."""
    folder = Path(folder)
    meta_path = folder / META
    if not meta_path.is_file():
        hint = (
            "its embedding did not finish; rerun vpt_dml.embed to resume"
            if (folder / CHUNKS).is_dir()
            else "it was written by an older vpt_dml.embed (no model fingerprint, no image "
            "folder); run python -m vpt_dml.embed WEIGHTS IMAGE_DIR again"
        )
        raise UserError(f"{folder} has no {META}: {hint}")
    meta = json.loads(meta_path.read_text())
    embeddings = np.load(folder / EMBEDDINGS)
    names = (folder / FILE_LIST).read_text().splitlines()
    if len(names) != len(embeddings) or len(names) != meta.get("count"):
        raise UserError(
            f"{folder}: {len(names)} files but {len(embeddings)} embeddings; run vpt_dml.embed again"
        )
    root = Path(meta["image_root"])
    return Gallery(embeddings, [root / n for n in names], meta)


def check_same_model(gallery: Gallery, fingerprint: dict, weights: Path, folder: Path) -> None:
    """Refuse to compare embeddings of two different models (the numbers would mean nothing)."""
    theirs = gallery.meta["model"]["fingerprint"]
    if theirs.get("id") != fingerprint["id"]:
        raise UserError(
            f"the gallery {folder} was embedded with another model (fingerprint "
            f"{theirs.get('id', '?')[:12]}) than {weights} ({fingerprint['id'][:12]}); "
            f"embed the gallery again with {weights}, or query with the model that embedded it"
        )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "weights", type=Path, help="a .safetensors file from `python -m vpt_dml.export`"
    )
    parser.add_argument(
        "--backbone-weights", help="local checkpoint of the backbone (instead of the hub)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--skip-broken",
        action="store_true",
        help="leave out images that cannot be decoded (listed in skipped.txt) instead of stopping",
    )
