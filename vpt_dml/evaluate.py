"""`python -m vpt_dml.evaluate WEIGHTS --queries Q --gallery G`: the suite's metrics on folders.

Q and G are labelled folders (one subfolder per class, same name = same class); queries
are ranked against the gallery only, by the suite's exact k-NN (vpt_dml/serving/folders.py).
WEIGHTS is a file written by `python -m vpt_dml.export`.

Q and G holding the same files (the same folder twice, or a link to it): each query is left
out of its own neighbours, as training-time evaluation does (else every query finds itself
at rank 1). Q and G sharing only some files: refused (a shared query would find itself).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vpt_dml.errors import UserError
from vpt_dml.serving.embeddings import add_model_arguments
from vpt_dml.serving.exported import load_exported
from vpt_dml.serving.folders import (
    embed_labelled,
    folder_metrics,
    leave_one_out_metrics,
    same_files,
)

LEAVE_ONE_OUT = (
    "queries and gallery are the same {n} files: each query is left out of its own "
    "neighbours (as training-time evaluation does)"
)


def parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None
    return ks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vpt_dml.evaluate", description=__doc__.split("\n")[0]
    )
    add_model_arguments(parser)
    parser.add_argument("--queries", type=Path, required=True, help="labelled query folder")
    parser.add_argument("--gallery", type=Path, required=True, help="labelled gallery folder")
    parser.add_argument(
        "--ks", type=parse_ks, default=(1, 2, 4, 8), help="Recall@K cut-offs, e.g. 1,10,20,30"
    )
    parser.add_argument("--out", type=Path, help="also write the metrics and counts as JSON")
    args = parser.parse_args(argv)
    try:
        model = load_exported(args.weights, backbone_weights=args.backbone_weights)
        kw = dict(
            batch_size=args.batch_size,
            device=args.device,
            progress=not args.no_progress,
            skip_broken=args.skip_broken,
        )
        overlap = same_files(args.queries, args.gallery)
        queries = embed_labelled(model, args.queries, "queries", **kw)
        if overlap:  # embedded once: the gallery is the query set
            result = leave_one_out_metrics(queries, args.ks)
            skipped = queries.skipped
        else:
            gallery = embed_labelled(model, args.gallery, "gallery", **kw)
            result = folder_metrics(queries, gallery, args.ks)
            result["mode"] = "gallery"
            skipped = queries.skipped + gallery.skipped
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["skipped"] = [f"{p}\t{r}" for p, r in skipped]
    if overlap:
        print(LEAVE_ONE_OUT.format(n=result["queries"]))
    print(
        f"{result['queries']} queries ({result['query_classes']} classes) against "
        f"{result['gallery']} gallery images ({result['gallery_classes']} classes)"
    )
    for name, value in result["metrics"].items():
        print(f"  {name:<12} {100 * value:6.2f}")
    if result["queries_without_gallery_class"]:
        print(
            f"{result['queries_without_gallery_class']} queries have no "
            f"{'other ' if overlap else ''}gallery image of their class: left out of every metric",
            file=sys.stderr,
        )
    if skipped:
        print(f"skipped {len(skipped)} undecodable image(s)", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
