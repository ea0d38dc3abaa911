"""`python -m vpt_dml.index build EMB_DIR INDEX`: a saved faiss index over embed's output.

Exact (IndexFlatIP, searched by the suite's tie rule) by default; `--kind ivf` or
`--kind hnsw` for large galleries, with their recall@10 against exact search measured on
held-out queries (for hnsw: not nodes of the graph while it is measured) and written to
INDEX.json. See vpt_dml/serving/index.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vpt_dml.errors import UserError
from vpt_dml.serving.index import KINDS, Params, build_from_embed, meta_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vpt_dml.index", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="index an output folder of vpt_dml.embed")
    b.add_argument("emb_dir", type=Path, help="output folder of `python -m vpt_dml.embed`")
    b.add_argument("index", type=Path, help="the index file to write (+ INDEX.json beside it)")
    b.add_argument("--kind", default="flat", choices=KINDS, help="flat (exact), ivf or hnsw")
    d = Params()
    b.add_argument("--nlist", type=int, default=None, help="ivf cells (default ~4 sqrt(n))")
    b.add_argument("--nprobe", type=int, default=d.nprobe, help="ivf cells searched per query")
    b.add_argument("--m", type=int, default=d.m, help="hnsw links per node")
    b.add_argument("--ef-construction", type=int, default=d.ef_construction)
    b.add_argument("--ef-search", type=int, default=d.ef_search, help="hnsw search breadth")
    b.add_argument("--train-size", type=int, default=d.train_size, help="ivf k-means sample")
    b.add_argument(
        "--recall-queries",
        type=int,
        default=d.recall_queries,
        help="held-out queries for the measured recall@10 (ivf / hnsw)",
    )
    b.add_argument("--seed", type=int, default=d.seed)
    args = parser.parse_args(argv)
    params = Params(
        kind=args.kind,
        nlist=args.nlist,
        nprobe=args.nprobe,
        m=args.m,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
        train_size=args.train_size,
        recall_queries=args.recall_queries,
        seed=args.seed,
    )
    try:
        meta = build_from_embed(args.emb_dir, args.index, params)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    recall = (
        f", recall@10 {meta['recall@10']:.4f} vs exact on {meta['recall_queries']} held-out "
        f"queries over {meta['recall_index_rows']} indexed rows"
        if "recall@10" in meta
        else ""
    )
    print(
        f"wrote {args.index} ({meta['kind']} {meta['params'] or ''}, {meta['count']} rows of dim "
        f"{meta['dim']}{recall}) and {meta_path(args.index)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
