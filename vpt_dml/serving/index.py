"""A saved faiss index over `vpt_dml.embed`'s output, and search with the suite's tie rule.

Files: INDEX (faiss.write_index) and INDEX.json beside it: format, the model fingerprint
embed.json recorded, dim, count, kind and its parameters, the image root, the gallery
file names in row order and, for an approximate kind, its measured recall@10.

Kinds:
- flat (default): IndexFlatIP on the L2-normalised rows. Search is exact by the rule
  `evaluation.knn` documents: similarity = `exact_dot` of the float64-normalised rows,
  highest first, equal values -> lower gallery index first. faiss's float32 scores only
  propose candidates; they are re-scored in float64, and a query's candidate list grows
  until no row outside it can reach its k-th value (float32 error bound `_slack`).
- ivf: IndexIVFFlat (nlist cells, nprobe probed), k-means trained on a sample.
- hnsw: IndexHNSWFlat (M links, efConstruction, efSearch).
For both approximate kinds `build` measures recall@10 against exact search on held-out
queries, rows left out of the ivf training sample (each query's own row not counted) and
out of the HNSW graph while it is measured (a node of the graph finds its neighbours
through its own links: 0.95 measured vs 0.55 on new queries); they are added after, and
the graph's nodes renumbered to row order.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vpt_dml.errors import UserError
from vpt_dml.evaluation.knn import exact_dot, unit_rows
from vpt_dml.serving.embeddings import FILE_LIST, read_embeddings

FORMAT = "vpt_dml.index/1"
KINDS = ("flat", "ivf", "hnsw")
RECALL_AT = 10
# rows whose norm is this close to 1 are kept as given: exact search then ranks the very
# rows the suite's evaluation ranks (float32 renormalising would move them by an ulp)
UNIT_TOLERANCE = 1e-4
RERANK_ELEMENTS = 1 << 24  # float64 values re-scored at once (128 MiB)


def _faiss():
    import faiss  # imported late: `python -m vpt_dml.retrieve` on a folder does not need it

    return faiss


def meta_path(index: Path) -> Path:
    return Path(str(index) + ".json")


def normalised(x: np.ndarray) -> np.ndarray:
    """float32 rows of unit norm; rows already unit (embed's output) are left bit-equal."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    if len(x) and np.all(np.abs(norms - 1) <= UNIT_TOLERANCE):
        return x
    x = x.copy()
    _faiss().normalize_L2(x)
    return x


def default_nlist(n: int) -> int:
    # faiss's rule of thumb: ~4 sqrt(n) cells, each trained on >= 39 points
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


@dataclass
class Params:
    kind: str = "flat"
    nlist: int | None = None
    nprobe: int = 16
    m: int = 32
    ef_construction: int = 80
    ef_search: int = 64
    train_size: int = 50_000
    recall_queries: int = 1000
    seed: int = 0

    def check(self, n: int) -> None:
        if self.kind not in KINDS:
            raise UserError(f"--kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}")
        for name in ("nprobe", "m", "ef_construction", "ef_search", "train_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1")
        if self.nlist is not None and not 1 <= self.nlist <= n:
            raise UserError(f"--nlist {self.nlist} must lie in [1, {n}] (the gallery's size)")
        if self.recall_queries < 0:
            raise UserError(f"--recall-queries {self.recall_queries} must be >= 0")


def _new_index(p: Params, dim: int, n: int, train: np.ndarray):
    faiss = _faiss()
    if p.kind == "flat":
        return faiss.IndexFlatIP(dim), {}
    if p.kind == "ivf":
        nlist = p.nlist or default_nlist(len(train))
        if len(train) < nlist:
            raise UserError(
                f"--nlist {nlist} needs at least {nlist} training rows, --train-size gives "
                f"{len(train)}; lower --nlist or raise --train-size"
            )
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = p.seed
        index.train(train)
        index.nprobe = min(p.nprobe, nlist)
        return index, {"nlist": nlist, "nprobe": int(index.nprobe)}
    index = faiss.IndexHNSWFlat(dim, p.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = p.ef_construction
    index.hnsw.efSearch = p.ef_search
    return index, {"M": p.m, "efConstruction": p.ef_construction, "efSearch": p.ef_search}


def set_search_params(index, kind: str, params: dict) -> None:
    """nprobe / efSearch are not all saved by write_index: set them again after loading."""
    if kind == "ivf":
        index.nprobe = int(params["nprobe"])
    elif kind == "hnsw":
        index.hnsw.efSearch = int(params["efSearch"])


def build(
    embeddings: np.ndarray, p: Params, rng: np.random.Generator | None = None
) -> tuple[object, dict]:
    """A filled index and its record (kind, parameters, measured recall for ivf / hnsw)."""
    x = normalised(embeddings)
    n, dim = x.shape
    p.check(n)
    rng = rng or np.random.default_rng(p.seed)
    order = rng.permutation(n)
    approximate = p.kind != "flat"
    # held-out queries stay out of the training sample (both when n allows); hnsw's also stay
    # out of the graph while it is measured, so that graph is smaller than the saved one:
    # at most a tenth of the rows (a smaller graph is searched a little better)
    most = (n // 10 or n // 2) if p.kind == "hnsw" else n // 2
    n_queries = min(p.recall_queries, most) if approximate else 0
    held_out, rest = order[:n_queries], order[n_queries:]
    train = x[np.sort(rest[: p.train_size])] if p.kind == "ivf" else x[:0]
    index, params = _new_index(p, dim, n, train)
    record: dict = {"kind": p.kind, "params": params}
    if p.kind == "ivf":
        record["params"]["train_size"] = len(train)
    if not (approximate and n_queries):
        index.add(x)
        return index, record
    queries = np.sort(held_out)
    if p.kind == "ivf":
        # a query's own row does not steer an ivf search (the cells are fixed by training on
        # other rows): every row goes in, and each query's own row is not counted
        index.add(x)
        members = np.arange(n)
    else:
        # a node of the graph reaches its neighbours through its own links (0.95 measured
        # vs 0.55 on new queries): the graph is measured without the queries, then they go in
        members = np.sort(rest)
        index.add(x[members])
    record["recall@10"] = measured_recall(index, x, members, queries)
    record["recall_queries"] = int(n_queries)
    record["recall_index_rows"] = int(len(members))
    if p.kind == "hnsw":  # node j holds row (members, queries)[j]: renumber to row order
        index.add(x[queries])
        index.permute_entries(np.argsort(np.concatenate([members, queries])).astype(np.int64))
    return index, record


def measured_recall(index, x: np.ndarray, members: np.ndarray, queries: np.ndarray) -> float:
    """Mean share of the exact top-10 among rows `members` that `index` finds for `queries`.

    `index` holds the rows `members`, its result j meaning row members[j]; a query that is
    one of them is not counted among its own neighbours.
    """
    k = min(RECALL_AT, len(members) - int(np.isin(queries, members).any()))
    _, approx = index.search(x[queries], k + 1)
    approx = np.where(approx >= 0, members[np.maximum(approx, 0)], -1)
    _, exact = exact_search(x[members], x[queries], k + 1)
    exact = members[exact]
    hits = 0
    for q, a, e in zip(queries, approx, exact):
        a = [i for i in a if i != q and i >= 0][:k]
        e = [i for i in e if i != q][:k]
        hits += len(set(a) & set(e))
    return hits / (k * len(queries))


def _slack(dim: int) -> float:
    """Bound on |faiss float32 score - exact_dot| for near-unit rows (GEMM and norm error)."""
    u = 2.0**-24
    return 4 * dim * u / (1 - dim * u) + 1e-6


def exact_rerank(
    gallery: np.ndarray, queries: np.ndarray, cand: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates (Q, C) re-scored by `exact_dot` and sorted by (value desc, index asc)."""
    g = unit_rows(torch.from_numpy(gallery[np.maximum(cand, 0)].reshape(-1, gallery.shape[1])))
    q = unit_rows(torch.from_numpy(queries))
    s = exact_dot(q.repeat_interleave(cand.shape[1], 0), g).view(cand.shape).numpy()
    s = np.where(cand < 0, -np.inf, s)
    order = np.lexsort((cand, -s), axis=1)  # last key first: value, then index
    return np.take_along_axis(s, order, 1), np.take_along_axis(cand, order, 1)


def exact_search(
    gallery: np.ndarray, queries: np.ndarray, k: int, index=None
) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k by the suite's rule; `index` (a flat one over `gallery`) proposes."""
    if index is None:
        index = _faiss().IndexFlatIP(gallery.shape[1])
        index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    n = len(gallery)
    k = min(k, n)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    out_s = np.empty((len(queries), k))
    out_i = np.empty((len(queries), k), dtype=np.int64)
    todo = np.arange(len(queries))
    width = min(n, k + 16)
    slack = _slack(gallery.shape[1])
    while len(todo):
        left = []
        step = max(1, RERANK_ELEMENTS // (width * gallery.shape[1]))  # bounded memory
        for lo in range(0, len(todo), step):
            rows = todo[lo : lo + step]
            approx, cand = index.search(queries[rows], width)
            s, i = exact_rerank(gallery, queries[rows], cand)
            # a row outside the list scores <= the list's last float32 score (+ slack): it
            # can only tie or beat the k-th when that bound reaches the k-th exact value
            done = (width >= n) | (approx[:, -1].astype(np.float64) + slack < s[:, k - 1])
            out_s[rows[done]], out_i[rows[done]] = s[done, :k], i[done, :k]
            left.append(rows[~done])
        todo = np.concatenate(left)
        width = min(n, width * 4)
    return out_s, out_i


def tie_ordered(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An approximate index's lists, equal scores ordered by lower gallery index."""
    order = np.lexsort((ids, -scores.astype(np.float64)), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


@dataclass
class SavedIndex:
    index: object
    meta: dict
    path: Path

    @property
    def paths(self) -> list[Path]:
        root = Path(self.meta["image_root"])
        return [root / name for name in self.meta["files"]]

    def gallery_rows(self) -> np.ndarray:
        """The stored rows (flat only: what exact re-scoring needs)."""
        faiss = _faiss()
        return faiss.rev_swig_ptr(self.index.get_xb(), self.index.ntotal * self.index.d).reshape(
            self.index.ntotal, self.index.d
        )

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, gallery rows) of the top k per query: exact for flat, else faiss's."""
        q = normalised(queries)
        if q.shape[1] != self.meta["dim"]:
            raise UserError(
                f"queries have dim {q.shape[1]}, the index {self.path} holds dim "
                f"{self.meta['dim']}; query with the model that built it"
            )
        k = min(k, self.meta["count"])
        if self.meta["kind"] == "flat":
            return exact_search(self.gallery_rows(), q, k, self.index)
        scores, ids = self.index.search(q, k)
        return tie_ordered(scores, ids)


def write(index, meta: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _faiss().write_index(index, str(path))
    meta_path(path).write_text(json.dumps(meta, indent=1) + "\n")


def read(path: Path) -> SavedIndex:
    path = Path(path)
    side = meta_path(path)
    if not path.is_file() or not side.is_file():
        raise UserError(
            f"{path} is not a saved index (it and {side.name} beside it are needed); "
            "build one with python -m vpt_dml.index build EMB_DIR INDEX"
        )
    try:
        meta = json.loads(side.read_text())
    except ValueError:
        raise UserError(f"{side} is not valid JSON; build the index again") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{side} is not a vpt_dml index (format {meta.get('format')!r})")
    try:
        index = _faiss().read_index(str(path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"faiss cannot read {path} ({first}); build the index again") from None
    if index.ntotal != meta["count"] or index.d != meta["dim"]:
        raise UserError(
            f"{path} holds {index.ntotal} rows of dim {index.d}, {side.name} says "
            f"{meta['count']} of dim {meta['dim']}; build the index again"
        )
    set_search_params(index, meta["kind"], meta["params"])
    return SavedIndex(index, meta, path)


def build_from_embed(emb_dir: Path, out: Path, p: Params) -> dict:
    """`python -m vpt_dml.index build`: index an embed output folder; returns INDEX.json."""
    gallery = read_embeddings(emb_dir)
    index, record = build(gallery.embeddings, p)
    meta = {
        "format": FORMAT,
        "model": gallery.meta["model"],
        "dim": int(gallery.embeddings.shape[1]),
        "count": int(len(gallery.embeddings)),
        **record,
        "image_root": gallery.meta["image_root"],
        "embeddings": str(Path(emb_dir).resolve()),
        "files": (Path(emb_dir) / FILE_LIST).read_text().splitlines(),
    }
    write(index, meta, out)
    return meta


def check_model(saved: SavedIndex, fingerprint: dict, weights: Path) -> None:
    """Refuse an index of another model: its neighbours would mean nothing."""
    theirs = (saved.meta.get("model") or {}).get("fingerprint") or {}
    if theirs.get("id") != fingerprint["id"]:
        raise UserError(
            f"the index {saved.path} was built from embeddings of another model (fingerprint "
            f"{str(theirs.get('id', '?'))[:12]}) than {weights} ({fingerprint['id'][:12]}); "
            f"embed the gallery with {weights} and build the index again"
        )
