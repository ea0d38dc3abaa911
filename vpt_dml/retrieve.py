"""`python -m vpt_dml.retrieve WEIGHTS QUERY_IMAGES GALLERY_DIR --top-k 5`: nearest images.

QUERY_IMAGES is an image file or a folder; GALLERY_DIR is a folder of images or an
output folder of `vpt_dml.embed` (its embeddings are reused). Exact cosine k-NN. Prints
each query's top-k and writes them as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from vpt_dml.embed import EMBEDDINGS, add_model_arguments, embed_files, list_images, read_embeddings
from vpt_dml.errors import UserError
from vpt_dml.export import load_exported


def nearest(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices) of the k most cosine-similar gallery rows per query."""
    sims = torch.from_numpy(queries).double() @ torch.from_numpy(gallery).double().T
    top = torch.topk(sims, min(k, gallery.shape[0]), dim=1)
    return top.values.numpy(), top.indices.numpy()


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
    try:
        if args.top_k < 1:
            raise UserError(f"--top-k {args.top_k} must be at least 1")
        model = load_exported(args.weights, backbone_weights=args.backbone_weights)
        progress = not args.no_progress
        if (args.gallery / EMBEDDINGS).is_file():
            gallery, names = read_embeddings(args.gallery)
            gallery_paths = [str(args.gallery / n) for n in names]
        else:
            files = list_images(args.gallery)
            gallery = embed_files(model, files, args.batch_size, args.device, progress, "gallery")
            gallery_paths = [str(f) for f in files]
        query_files = list_images(args.queries)
        queries = embed_files(model, query_files, args.batch_size, args.device, progress, "queries")
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
            {"path": gallery_paths[i], "similarity": float(s)} for s, i in zip(row_sims, row_idx)
        ]
        results.append({"query": str(query_files[q]), "neighbours": hits})
        print(str(query_files[q]))
        for rank, hit in enumerate(hits, 1):
            print(f"  {rank}. {hit['similarity']:.4f}  {hit['path']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
