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
import sys
from pathlib import Path

from vpt_dml.errors import UserError
from vpt_dml.serving.embeddings import (
    SKIP_FLAG_HINT,
    add_model_arguments,
    embed_files,
)
from vpt_dml.serving.exported import load_exported
from vpt_dml.serving.search import (
    LIST_SUFFIXES,
    ONE_QUERY_HINT,
    contact_sheet,
    default_out,
    open_gallery,
    query_files_of,
    search_gallery,
    write_results,
)


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
        source = open_gallery(args.gallery, args.weights)  # a refusal costs no embedding
        if args.out is None:
            args.out = default_out(args.gallery, source.kind)
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
        sims, idx, gallery_paths, more = search_gallery(
            model, source, args.gallery, queries, args.top_k, args.batch_size, args.device,
            progress, args.skip_broken,
        )  # fmt: skip
        skipped += more
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
