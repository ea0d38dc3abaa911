"""The library behind `python -m vpt_dml.retrieve WEIGHTS QUERIES GALLERY --top-k 5`: nearest images.
(the command itself, its arguments and messages: vpt_dml/retrieve.py).

QUERIES is an image file, a folder (searched recursively) or a list file (.txt, one image
path per line, relative to the list's folder). GALLERY is a saved index of
`python -m vpt_dml.index build` (the file; INDEX.json beside it), an output folder of
`vpt_dml.embed`, or a folder of images. An index or embed output made by another model
than WEIGHTS is refused. Queries are embedded in batches (--device: the GPU when there is
one). A flat index, an embed output and an image folder give the exact cosine k-NN by the
suite's tie rule (equal similarity: lower gallery index first); ivf / hnsw indexes are
approximate. Prints each query's top-k with the gallery images' real paths and writes
(query, rank, gallery path, score) to --out: JSON, or CSV when the name ends in .csv;
--gallery-png draws a contact sheet (a row per query: the query, then its top-k).
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vpt_dml.errors import UserError
from vpt_dml.evaluation.gallery import plot_gallery
from vpt_dml.serving.embeddings import (
    CHUNKS,
    EMBEDDINGS,
    IMAGE_SUFFIXES,
    META,
    Gallery,
    check_same_model,
    embed_files,
    list_images,
    model_fingerprint,
    read_embeddings,
)
from vpt_dml.serving.exported import ExportedModel
from vpt_dml.serving.index import SavedIndex, check_model, exact_search, meta_path, normalised, read

ONE_QUERY_HINT = f"give an image file ({', '.join(sorted(IMAGE_SUFFIXES))})"
LIST_SUFFIXES = {".txt", ".lst", ".list"}


def nearest(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices) of the k nearest gallery rows: exact, the suite's tie rule."""
    return exact_search(normalised(gallery), normalised(queries), k)


def is_embed_output(folder: Path) -> bool:
    return any((folder / name).exists() for name in (EMBEDDINGS, META, CHUNKS))


def is_index(path: Path) -> bool:
    return path.is_file() and meta_path(path).is_file()


def query_files_of(queries: Path) -> list[Path]:
    """An image, a folder of them, or a list file of image paths (relative to the list)."""
    if queries.is_file() and queries.suffix.lower() in LIST_SUFFIXES:
        lines = [ln.strip() for ln in queries.read_text().splitlines()]
        files = [queries.parent / ln for ln in lines if ln and not ln.startswith("#")]
        missing = [f for f in files if not f.is_file()]
        if missing or not files:
            what = f"names {missing[0]}, which does not exist" if missing else "names no image"
            raise UserError(
                f"the query list {queries} {what}; one image path per line, relative to "
                "the list's folder"
            )
        return files
    return list_images(queries)


def default_out(gallery: Path, kind: str) -> Path:
    """Where results go without --out: beside the gallery, as embed / index / report keep
    their outputs with their inputs (the working directory would collect stray files)."""
    if kind == "embed":  # our own output folder: the results join it
        return gallery / "retrieval.json"
    if kind == "index":  # gallery.faiss -> gallery.retrieval.json (not .faiss.json, its meta)
        return gallery.with_suffix(".retrieval.json")
    # a folder of images is the user's: beside it, never into it
    folder = Path(gallery).resolve()
    if not folder.name:
        raise UserError(f"the gallery {gallery} has no folder beside it to write to; pass --out")
    return folder.with_name(folder.name + ".retrieval.json")


def write_results(results: list[dict], out: Path) -> None:
    """JSON (a query and its ranked neighbours per entry) or CSV (one row per hit)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        with open(out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["query", "rank", "gallery_path", "score"])
            for r in results:
                for hit in r["neighbours"]:
                    w.writerow([r["query"], hit["rank"], hit["path"], f"{hit['similarity']:.8f}"])
    else:
        out.write_text(json.dumps(results, indent=2) + "\n")


def contact_sheet(results: list[dict], out: Path) -> str | None:
    """The query, then its top-k, per row; None, or why it could not be drawn."""
    paths = [r["query"] for r in results] + [h["path"] for r in results for h in r["neighbours"]]
    gone = next((p for p in paths if not Path(p).is_file()), None)
    if gone is not None:
        return f"{gone} is not on disk"
    neighbours = [[(h["path"], None) for h in r["neighbours"]] for r in results]
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_gallery([r["query"] for r in results], neighbours, "query, then its top-k", out)
    return None


@dataclass
class GallerySource:
    """What the gallery argument names: a saved index, an embed output, or images."""

    kind: str  # "index" | "embed" | "images"
    saved: SavedIndex | None = None
    stored: Gallery | None = None


def open_gallery(gallery: Path, weights: Path) -> GallerySource:
    """The gallery, checked against the model before any embedding."""
    if is_index(gallery):
        saved = read(gallery)
        check_model(saved, model_fingerprint(weights), weights)
        return GallerySource("index", saved=saved)
    if is_embed_output(gallery):
        stored = read_embeddings(gallery)
        check_same_model(stored, model_fingerprint(weights), weights, gallery)
        return GallerySource("embed", stored=stored)
    return GallerySource("images")


def search_gallery(
    model: ExportedModel,
    source: GallerySource,
    gallery_dir: Path,
    queries: np.ndarray,
    k: int,
    batch_size: int,
    device: str,
    progress: bool,
    skip_broken: bool,
) -> tuple[np.ndarray, np.ndarray, list, list[tuple[Path, str]]]:
    """(similarities, gallery rows, gallery paths, skipped gallery images) of each query's
    top k; a folder of images is embedded first."""
    saved, stored = source.saved, source.stored
    skipped: list[tuple[Path, str]] = []
    if saved is not None:
        sims, idx = saved.search(queries, k)
        gallery_paths = saved.paths
    elif stored is not None:
        gallery, gallery_paths = stored.embeddings, stored.paths
    else:
        files = list_images(gallery_dir)
        done = embed_files(model, files, batch_size, device, progress, "gallery", skip_broken)
        gallery, gallery_paths = done.embeddings, [files[i] for i in done.kept]
        skipped = done.skipped
    root = (saved.meta if saved is not None else stored.meta if stored else {}).get("image_root")
    if root and not Path(root).is_dir():
        print(
            f"warning: the gallery's image folder {root} is gone; "
            "the paths below name where the images were",
            file=sys.stderr,
        )
    if saved is None:
        if not len(gallery):
            raise UserError("no gallery image could be decoded (all were skipped)")
        if queries.shape[1] != gallery.shape[1]:
            raise UserError(
                f"gallery embeddings have dim {gallery.shape[1]}, the model gives "
                f"{queries.shape[1]}; embed the gallery with the same WEIGHTS"
            )
        sims, idx = nearest(queries, gallery, k)
    return sims, idx, gallery_paths, skipped
