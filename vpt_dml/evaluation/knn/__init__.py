"""Exact cosine ranking of every query's positives, fast on CPU and GPU.

Every retrieval metric we report (Recall@K, MAP@R, R-precision) depends only on where
the positives (same-class gallery items) land in the query's neighbour list. With the
positives sorted best first, n_j = number of negatives ranked above the j-th positive,
whose rank is then n_j + j. So instead of top-K lists (K = 1000 on SOP) we count, per
query and positive, the negatives that beat it:
- n_1 is exact up to `max_rank` (Recall@K needs the first positive's rank; deeper
  than the largest K only "beyond" matters);
- for j > 1, MAP@R and R-precision only look at ranks <= R + 1. A positive whose exact
  similarity is below a proven lower bound L on the (R+1)-th best similarity ranks
  beyond R + 1; it is reported as "beyond" (n_j = number of gallery items) and its
  negatives are not counted.

"Exact", and the tie rule: the similarity of a pair is `exact_dot` of the two
float64-normalised embeddings (`unit_rows`): products summed in one fixed pairwise order,
so its value depends only on the two vectors, bit for bit, on every device and in every
batch. Gallery items are ranked by that value, highest first; among items whose values
are equal the one with the lower gallery index ranks first. The index is the item's
position in the gallery (without a gallery: its position in the query set, i.e. the
dataset index), never relative to the query. Duplicated embeddings therefore always tie
exactly; e.g. N identical vectors rank every query's neighbours in index order. Faster
float64 kernels (a batched matmul for the positives) are used only where they are proven
to decide the order (further apart than both kernels' error bound, `float64_tolerance`);
closer pairs are re-scored by `exact_dot`. Every count equals what a float64 stable sort
of `exact_dot` values (in gallery order) gives.

Speed: the all-pairs similarity pass runs in reduced precision (`candidate_dtype_report`:
bfloat16 on CPUs with native bfloat16 matrix units, else float32; float32 on GPU) and
only proposes candidates. `_Bounds` gives a proven eps with |s_approx - s_exact| <= eps
for every pair (per query, and growing with |s|). A negative more than eps above (below)
a positive's similarity certainly beats (loses to) it; anything within eps is re-scored:
in float32 (bound gamma_D ~ 3e-5 for D = 512), and in float64 only if still within that
bound. A negative matters only if it could beat a positive that matters, so candidates
are the entries with s_approx >= lo (per query); maxima over 64-wide runs find them
without another full pass. Every query starts with lo from its own positives. When the
query set is its own gallery the matrix is symmetric: only blocks on and above the
diagonal are computed and each off-diagonal block serves its rows and its columns. The
diagonal blocks go first: the maxima of their column runs give each query a first bound
L (R + 2 distinct items at least that similar), and the candidates of every block
tighten it (lo rises, deep positives retire). On CPU a block is computed 256 columns at
a time, each (4096 x 256) output max-pooled (64-wide row runs, 16-tall column runs) while
in cache; the candidates are then taken once per block (per-op overhead on small tiles
cost more than the filter's arithmetic). Blocks run on a few threads that each run
single-threaded ops (OpenMP's barriers cost more than these GEMMs on a busy machine);
one thread counts. Memory stays bounded by the block size, whatever the embeddings look
like.

Badly separated embeddings (an untrained or collapsed model) make candidates explode:
most entries pass the filter and, when many similarities tie or nearly tie, each is
re-scored on its own (10,000 identical rows: 10^8 exact re-scores, minutes). So when a
block side's filter passes more than `DENSE_SHARE` of the runs of its still-counting
queries, that side is counted densely instead (`_Counter.add_dense`): a float32 GEMM of
those queries against the block's gallery items (within a proven bound of `exact_dot`),
`exact_dot` for the entries within that bound of a positive, computed once per distinct
pair of vectors (equal embeddings share one value, so a collapsed set costs one per
chunk), and every entry compared with each positive that matters, exact ties by the
lower gallery index. Its cost is a GEMM and a few passes per entry and positive of the
still-counting queries, whatever the embeddings look like; only near-ties between
distinct vectors (closer than ~1e-5, not duplicates) are still re-scored one by one. The
counts are the same as the candidate path's, bit for bit.

The package, a module per job; the names tests, tools and `evaluation/` use import from
here as they did when it was one module (`__all__`; a test that patches a module global
patches the module that owns it):
- `dtype_choice`: the candidate GEMM dtype (`candidate_dtype_report`);
- `exact`: `exact_dot`, `unit_rows`, the error bounds (`float64_tolerance`, `_Bounds`),
  distinct-vector ids;
- `positives`: each query's positives in exact order;
- `blocks`: the candidate GEMM's blocks and their filter (`_Block`);
- `counter`: the counter of n_j and its dense path (`_Counter`);
- `rank`: the driver, `rank_positives`.
"""

from __future__ import annotations

from vpt_dml.evaluation.knn.blocks import COLUMN_RUN, SEGMENT, _Block, _padded
from vpt_dml.evaluation.knn.counter import DENSE_CHUNK, ENTRY_CHUNK, _Counter
from vpt_dml.evaluation.knn.dtype_choice import (
    BENCH_MARGIN,
    NATIVE_BF16_FLAGS,
    _proc_cpu_flags,
    candidate_dtype,
    candidate_dtype_report,
    decide_by_benchmark,
    decide_cpu_dtype,
)
from vpt_dml.evaluation.knn.exact import (
    PAIR_CHUNK,
    ROW_CHUNK,
    _Bounds,
    _distinct_ids,
    exact_dot,
    float64_tolerance,
    unit_rows,
)
from vpt_dml.evaluation.knn.rank import (
    BLOCK,
    DENSE_SHARE,
    MAX_WORKERS,
    TILE,
    PositiveRanks,
    rank_positives,
    single_threaded,
)

__all__ = [
    "BENCH_MARGIN",
    "BLOCK",
    "COLUMN_RUN",
    "DENSE_CHUNK",
    "DENSE_SHARE",
    "ENTRY_CHUNK",
    "MAX_WORKERS",
    "NATIVE_BF16_FLAGS",
    "PAIR_CHUNK",
    "PositiveRanks",
    "ROW_CHUNK",
    "SEGMENT",
    "TILE",
    "_Block",
    "_Bounds",
    "_Counter",
    "_distinct_ids",
    "_padded",
    "_proc_cpu_flags",
    "candidate_dtype",
    "candidate_dtype_report",
    "decide_by_benchmark",
    "decide_cpu_dtype",
    "exact_dot",
    "float64_tolerance",
    "rank_positives",
    "single_threaded",
    "unit_rows",
]
