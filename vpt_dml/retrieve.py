"""`python -m vpt_dml.retrieve WEIGHTS QUERY_IMAGES GALLERY_DIR --top-k 5`: nearest images.

QUERY_IMAGES is an image file or a folder; GALLERY_DIR is a folder of images or an
output folder of `vpt_dml.embed` (its embeddings are reused when they were made by the
same WEIGHTS; another model's are refused). Exact cosine k-NN. Prints each query's top-k
with the gallery images' real paths and writes them as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

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


def nearest(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices) of the k most cosine-similar gallery rows per query."""
    sims = torch.from_numpy(queries).double() @ torch.from_numpy(gallery).double().T
    top = torch.topk(sims, min(k, gallery.shape[0]), dim=1)
    return top.values.numpy(), top.indices.numpy()


def is_embed_output(folder: Path) -> bool:
    return any((folder / name).exists() for name in (EMBEDDINGS, META, CHUNKS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vpt_dml.retrieve", description=__doc__.split("\n")[0]
    )
    add_model_arguments(parser)
    parser.add_argument("queries", type=Path, help="a query image or a folder of them")
    parser.add_argument(
        "gallery", type=Path, help="folder of gallery images, or a vpt_dml.embed output folder"
    )
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=Path("retrieval.json"), help="where to save the results"
    )
    args = parser.parse_args(argv)
    skipped: list[tuple[Path, str]] = []
    try:
        if args.top_k < 1:
            raise UserError(f"--top-k {args.top_k} must be at least 1")
        progress = not args.no_progress
        stored = None
        if is_embed_output(args.gallery):  # checked first: a refusal costs no embedding
            stored = read_embeddings(args.gallery)
            check_same_model(stored, model_fingerprint(args.weights), args.weights, args.gallery)
        model = load_exported(args.weights, backbone_weights=args.backbone_weights)
        query_files = list_images(args.queries)
        # one query file: skipping it would leave nothing to do, so name the file instead
        one = args.queries.is_file()
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
        if stored is not None:
            gallery, gallery_paths = stored.embeddings, stored.paths
            if not Path(stored.meta["image_root"]).is_dir():
                print(
                    f"warning: the gallery's image folder {stored.meta['image_root']} is gone; "
                    "the paths below name where the images were",
                    file=sys.stderr,
                )
        else:
            files = list_images(args.gallery)
            done = embed_files(
                model, files, args.batch_size, args.device, progress, "gallery", args.skip_broken
            )
            gallery, gallery_paths = done.embeddings, [files[i] for i in done.kept]
            skipped += done.skipped
        if not len(gallery) or not len(queries):
            which = "gallery" if not len(gallery) else "query"
            raise UserError(f"no {which} image could be decoded (all were skipped)")
        if queries.shape[1] != gallery.shape[1]:
            raise UserError(
                f"gallery embeddings have dim {gallery.shape[1]}, the model gives {queries.shape[1]}; "
                "embed the gallery with the same WEIGHTS"
            )
        sims, idx = nearest(queries, gallery, args.top_k)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = []
    for q, (row_sims, row_idx) in enumerate(zip(sims, idx)):
        hits = [
            {"path": str(gallery_paths[i]), "similarity": float(s)}
            for s, i in zip(row_sims, row_idx)
        ]
        results.append({"query": str(query_files[q]), "neighbours": hits})
        print(str(query_files[q]))
        for rank, hit in enumerate(hits, 1):
            print(f"  {rank}. {hit['similarity']:.4f}  {hit['path']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved to {args.out}")
    if skipped:
        listing = args.out.with_suffix(".skipped.txt")
        listing.write_text("".join(f"{p}\t{r}\n" for p, r in skipped))
        print(f"skipped {len(skipped)} undecodable image(s), listed in {listing}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
