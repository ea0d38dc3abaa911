"""Search speed of `retrieve`'s index kinds over a generated 100,000-item gallery.

    python experiments/bench_retrieve.py                    # 100,000 x 384 (ViT-S/384)
    python experiments/bench_retrieve.py --dim 512 --queries 500

What is timed: the search stage of `python -m vpt_dml.retrieve` (SavedIndex.search on
already embedded queries, one batch, after the index is loaded), per kind:
- flat: IndexFlatIP + the exact float64 re-scoring by the suite's tie rule (what
  retrieve does with a flat index); `flat (faiss only)` is the float32 search alone;
- ivf: nlist = 4 sqrt(training sample) (894 for the default 50,000-row sample), nprobe 8
  and 32;
- hnsw: M 32, efConstruction 80, efSearch 32 and 128.
Recall@10 is measured against the exact search on the same queries (held out: not in the
gallery). Build times are printed too. Embedding the queries (the model) is not timed:
it is the same for every kind.

Data: clustered, as real embeddings are (not uniform noise, which no index can speed up):
2,000 "classes", item = class centre + noise, L2-normalised. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import faiss
import numpy as np

from vpt_dml.serving.index import Params, SavedIndex, build, default_nlist


def clustered(n: int, dim: int, classes: int, noise: float, rng: np.random.Generator):
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    x = centres[rng.integers(0, classes, n)]
    x += noise * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def recall(found: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(f[:k]) & set(e[:k])) / k for f, e in zip(found, exact)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--classes", type=int, default=2000)
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    data = clustered(args.n + args.queries, args.dim, args.classes, args.noise, rng)
    gallery, queries = data[: args.n], data[args.n :]
    print(
        f"gallery {args.n:,} x {args.dim}, {args.queries} held-out queries, top-{args.k}, "
        f"{args.threads} threads, load {os.getloadavg()[0]:.1f}"
    )

    runs = [
        ("flat", Params()),
        ("ivf nprobe 8", Params(kind="ivf", nprobe=8, recall_queries=0)),
        ("ivf nprobe 32", Params(kind="ivf", nprobe=32, recall_queries=0)),
        ("hnsw ef 32", Params(kind="hnsw", ef_search=32, recall_queries=0)),
        ("hnsw ef 128", Params(kind="hnsw", ef_search=128, recall_queries=0)),
    ]
    rows, exact, built = [], None, {}
    for name, p in runs:
        key = (p.kind, p.m, p.ef_construction)
        t = time.perf_counter()
        if key not in built:  # one build per kind; the search parameter is set after
            built[key] = build(gallery, p)[0]
            build_s = time.perf_counter() - t
        else:
            build_s = float("nan")
        index = built[key]
        params = {"nprobe": p.nprobe} if p.kind == "ivf" else {"efSearch": p.ef_search}
        if p.kind == "ivf":
            index.nprobe = p.nprobe
        elif p.kind == "hnsw":
            index.hnsw.efSearch = p.ef_search
        meta = {"kind": p.kind, "dim": args.dim, "count": args.n, "params": params}
        saved = SavedIndex(index, meta, Path("bench"))
        saved.search(queries[:50], args.k)  # warm-up
        t = time.perf_counter()
        _, ids = saved.search(queries, args.k)
        search_s = time.perf_counter() - t
        if exact is None:
            exact = ids
        rows.append((name, build_s, args.queries / search_s, recall(ids, exact, args.k)))
        if p.kind == "flat":  # the float32 search alone, for the cost of the exact re-scoring
            t = time.perf_counter()
            _, raw = index.search(queries, args.k)
            raw_s = time.perf_counter() - t
            rows.append(
                ("flat (faiss only)", float("nan"), args.queries / raw_s, recall(raw, exact))
            )
        print(f"  {rows[-1][0]:<18} done", flush=True)

    flat_qps = rows[0][2]
    print(f"\n{'kind':<18} {'build s':>8} {'queries/s':>10} {'x flat':>7} {'recall@10':>9}")
    for name, build_s, qps, rec in rows:
        b = f"{build_s:8.1f}" if build_s == build_s else f"{'':>8}"
        print(f"{name:<18} {b} {qps:10.1f} {qps / flat_qps:7.2f} {rec:9.4f}")
    print(
        json.dumps(
            {
                "n": args.n,
                "dim": args.dim,
                "queries": args.queries,
                "threads": args.threads,
                "nlist": default_nlist(min(args.n, Params().train_size)),
                "rows": [
                    {
                        "kind": r[0],
                        "build_s": r[1] if r[1] == r[1] else None,
                        "queries_per_s": r[2],
                        "recall@10": r[3],
                    }
                    for r in rows
                ],
            }
        )
    )


if __name__ == "__main__":
    main()
