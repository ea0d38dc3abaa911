"""`python -m vpt_dml.retrieve WEIGHTS QUERIES GALLERY --top-k 5`: nearest images.

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
Without --out the results go next to the gallery, never to the working directory:
EMB_DIR/retrieval.json in an embed output, INDEX's name with .retrieval.json beside a
saved index, IMAGE_DIR.retrieval.json beside (not into) a folder of images.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from vpt_dml.embed import (
    CHUNKS,
    EMBEDDINGS,
    IMAGE_SUFFIXES,
    META,
    SKIP_FLAG_HINT,
    add_model_arguments,
    check_same_model,
    embed_files,
    list_images,
    model_fingerprint,
    read_embeddings,
)
from vpt_dml.errors import UserError
from vpt_dml.export import load_exported

ONE_QUERY_HINT = f"give an image file ({', '.join(sorted(IMAGE_SUFFIXES))})"
LIST_SUFFIXES = {".txt", ".lst", ".list"}


def nearest(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices) of the k nearest gallery rows: exact, the suite's tie rule."""
    from vpt_dml.serving.index import exact_search, normalised

    return exact_search(normalised(gallery), normalised(queries), k)


def is_embed_output(folder: Path) -> bool:
    return any((folder / name).exists() for name in (EMBEDDINGS, META, CHUNKS))


def is_index(path: Path) -> bool:
    from vpt_dml.serving.index import meta_path

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
    from vpt_dml.callbacks.dashboard import plot_gallery

    paths = [r["query"] for r in results] + [h["path"] for r in results for h in r["neighbours"]]
    gone = next((p for p in paths if not Path(p).is_file()), None)
    if gone is not None:
        return f"{gone} is not on disk"
    neighbours = [[(h["path"], None) for h in r["neighbours"]] for r in results]
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_gallery([r["query"] for r in results], neighbours, "query, then its top-k", out)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vpt_dml.retrieve", description=__doc__.split("\n")[0]
    )
    add_model_arguments(parser)
    parser.add_argument(
        "queries", type=Path, help="a query image, a folder of them, or a .txt list of paths"
    )
    parser.add_argument(
        "gallery",
        type=Path,
        help="a saved index (vpt_dml.index build), a vpt_dml.embed output folder, or images",
    )
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument(
        "--out",
        type=Path,
        help="where to save the results (.json, or .csv: query, rank, gallery_path, score); "
        "default: next to the gallery (EMB_DIR/retrieval.json, INDEX.retrieval.json, "
        "IMAGE_DIR.retrieval.json)",
    )
    parser.add_argument("--gallery-png", type=Path, help="also draw a contact sheet here")
    args = parser.parse_args(argv)
    skipped: list[tuple[Path, str]] = []
    try:
        if args.top_k < 1:
            raise UserError(f"--top-k {args.top_k} must be at least 1")
        progress = not args.no_progress
        stored = saved = None
        # checked first: a refusal costs no embedding
        if is_index(args.gallery):
            from vpt_dml.serving.index import check_model, read

            saved = read(args.gallery)
            check_model(saved, model_fingerprint(args.weights), args.weights)
            kind = "index"
        elif is_embed_output(args.gallery):
            stored = read_embeddings(args.gallery)
            check_same_model(stored, model_fingerprint(args.weights), args.weights, args.gallery)
            kind = "embed"
        else:
            kind = "images"
        if args.out is None:
            args.out = default_out(args.gallery, kind)
        model = load_exported(args.weights, backbone_weights=args.backbone_weights)
        query_files = query_files_of(args.queries)
        # one query file: skipping it would leave nothing to do, so name the file instead
        one = args.queries.is_file() and args.queries.suffix.lower() not in LIST_SUFFIXES
        done = embed_files(
            model,
            query_files,
            args.batch_size,
            args.device,
            progress,
            "queries",
            args.skip_broken and not one,
            ONE_QUERY_HINT if one else SKIP_FLAG_HINT,
        )
        queries, query_files = done.embeddings, [query_files[i] for i in done.kept]
        skipped += done.skipped
        if not len(queries):
            raise UserError("no query image could be decoded (all were skipped)")
        if saved is not None:
            sims, idx = saved.search(queries, args.top_k)
            gallery_paths = saved.paths
        elif stored is not None:
            gallery, gallery_paths = stored.embeddings, stored.paths
        else:
            files = list_images(args.gallery)
            done = embed_files(
                model, files, args.batch_size, args.device, progress, "gallery", args.skip_broken
            )
            gallery, gallery_paths = done.embeddings, [files[i] for i in done.kept]
            skipped += done.skipped
        root = (saved.meta if saved is not None else stored.meta if stored else {}).get(
            "image_root"
        )
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
            sims, idx = nearest(queries, gallery, args.top_k)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = []
    for q, (row_sims, row_idx) in enumerate(zip(sims, idx)):
        hits = [
            {"rank": rank, "path": str(gallery_paths[i]), "similarity": float(s)}
            for rank, (s, i) in enumerate(zip(row_sims, row_idx), 1)
            if i >= 0  # an approximate index may find fewer than k
        ]
        results.append({"query": str(query_files[q]), "neighbours": hits})
        print(str(query_files[q]))
        for rank, hit in enumerate(hits, 1):
            print(f"  {rank}. {hit['similarity']:.4f}  {hit['path']}")
    write_results(results, args.out)
    print(f"saved to {args.out}")
    if args.gallery_png:
        why = contact_sheet(results, args.gallery_png)
        if why:
            print(f"warning: no contact sheet: {why}", file=sys.stderr)
        else:
            print(f"contact sheet: {args.gallery_png}")
    if skipped:
        listing = args.out.with_suffix(".skipped.txt")
        listing.write_text("".join(f"{p}\t{r}\n" for p, r in skipped))
        print(f"skipped {len(skipped)} undecodable image(s), listed in {listing}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
