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
"""

from __future__ import annotations

import collections
import contextlib
import math
import platform
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

SEGMENT = 64  # column segment width of the max-pool candidate filter
COLUMN_RUN = 16  # its row-run height for the transposed side (strided reads: kept short)
BLOCK = 4096  # rows and columns per similarity block (rounded to a multiple of TILE)
TILE = 256  # columns per GEMM call on CPU: a BLOCK x TILE output stays in cache
ENTRY_CHUNK = 1 << 19  # candidate entries compared against the positives at a time
ROW_CHUNK = 4096  # rows per float64 helper computation
MAX_WORKERS = 8  # default cap on block threads (each holds a BLOCK x TILE buffer)
# a block side whose candidate filter passes more than this share of its column runs is
# counted densely: past it, per-candidate bookkeeping costs more than comparing every entry
DENSE_SHARE = 1 / 8
DENSE_CHUNK = 1 << 20  # entries of a dense chunk (rows x gallery columns)
PAIR_CHUNK = (
    256  # vector pairs gathered at a time for re-scoring (stays in L2: 3x faster than 2048)
)


@dataclass
class PositiveRanks:
    """Per query: R and n_j (negatives ranked above the j-th best positive)."""

    num_positives: torch.Tensor  # (Q,)
    negatives_above: torch.Tensor  # (Q, R_max) int64; "beyond R + 1" positives hold len(gallery)
    candidates: int = 0  # candidate entries examined (dense block sides: every entry)
    rescored: int = 0  # similarities re-scored beyond the block GEMM (float32 / exact_dot)
    dense_entries: int = 0  # entries counted by the dense path (`_Counter.add_dense`)


# --- candidate dtype: bfloat16 only where the CPU multiplies bfloat16 natively -------------

# x86 flags of bfloat16 matrix instructions (AVX512-BF16 dot products, AMX tiles); a CPU
# with AVX-512 but neither runs oneDNN's bfloat16 GEMM emulated, about 2x slower than float32
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "amx_tile"})
_SHOWN_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "amx_tile", "amx_bf16", "amx_int8", "bf16", "sve", "i8mm")  # fmt: skip
BENCH_MARGIN = 0.7  # bfloat16 must beat float32 clearly: it also widens the re-score window
_CPU_CHOICE: dict | None = None  # decided once per process


def decide_cpu_dtype(
    flags: set[str] | None, onednn_bf16: bool, x86: bool
) -> tuple[torch.dtype | None, str]:
    """(dtype, reason) from what the CPU reports; dtype None: undecided, benchmark both.

    `flags`: the CPU's feature flags (None when unknown), `onednn_bf16`: whether torch's
    oneDNN has bfloat16 kernels for this CPU at all (true on any AVX-512 CPU, emulated or
    not, so it is necessary but not sufficient).
    """
    if not onednn_bf16:
        return torch.float32, "torch's oneDNN has no bfloat16 GEMM for this CPU"
    if flags is None or not x86:
        return None, "bfloat16 speed unknown from the CPU flags: measured"
    native = sorted(flags & NATIVE_BF16_FLAGS)
    if native:
        return torch.bfloat16, f"native bfloat16 matrix instructions ({', '.join(native)})"
    return torch.float32, (
        "no native bfloat16 matrix instructions (no avx512_bf16 or amx_bf16): "
        "bfloat16 GEMM would be emulated and slower than float32"
    )


def decide_by_benchmark(times: dict[str, float]) -> tuple[torch.dtype, str]:
    """bfloat16 when its GEMM took under BENCH_MARGIN of float32's time."""
    bf16, fp32 = times["bfloat16"], times["float32"]
    choice = torch.bfloat16 if bf16 < BENCH_MARGIN * fp32 else torch.float32
    return choice, (
        f"measured GEMM 1024x1024x512: bfloat16 {bf16 * 1e3:.2f} ms, float32 {fp32 * 1e3:.2f} ms "
        f"(bfloat16 chosen below {BENCH_MARGIN} x float32)"
    )


def _proc_cpu_flags(path: str = "/proc/cpuinfo") -> set[str] | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, ARM
            return set(value.split())
    return None


def _torch_cpu_flags() -> set[str] | None:
    """The bfloat16 flags torch's own CPU probe (cpuinfo) reports; None if it has none."""
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported"}
    found, asked = set(), False
    for flag, name in probes.items():
        probe = getattr(torch.cpu, name, None)
        if probe is None:
            continue
        try:
            asked = True
            if probe():
                found.add(flag)
        except RuntimeError:
            continue
    return found if asked else None


def _onednn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _benchmark_gemm(size: int = 1024, dim: int = 512, reps: int = 3) -> dict[str, float]:
    """Best-of-`reps` seconds of one size x size x dim GEMM per dtype, interleaved."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, dim, generator=gen), torch.randn(size, dim, generator=gen)
    pairs = {"float32": (a, b), "bfloat16": (a.bfloat16(), b.bfloat16())}
    best = dict.fromkeys(pairs, math.inf)
    for _ in range(reps + 1):  # the first round warms up
        for name, (x, y) in pairs.items():
            t = time.perf_counter()
            x @ y.T
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def _decide_cpu() -> dict:
    proc = _proc_cpu_flags()
    from_torch = _torch_cpu_flags()
    flags = None if proc is None and from_torch is None else (proc or set()) | (from_torch or set())
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
    onednn = _onednn_bf16()
    dtype, reason = decide_cpu_dtype(flags, onednn, x86)
    report = {
        "device": "cpu",
        "machine": platform.machine(),
        "cpu_flags": sorted(f for f in (flags or ()) if f in _SHOWN_FLAGS),
        "flags_from": [
            n for n, f in (("/proc/cpuinfo", proc), ("torch.cpu", from_torch)) if f is not None
        ],
        "onednn_bf16": onednn,
    }
    if dtype is None:
        times = _benchmark_gemm()
        dtype, reason = decide_by_benchmark(times)
        report["benchmark_s"] = {k: round(v, 6) for k, v in times.items()}
    report.update(dtype=str(dtype).removeprefix("torch."), reason=reason)
    return report


def candidate_dtype_report(device: torch.device | str = "cpu") -> dict:
    """The candidate GEMM dtype for `device` and why (JSON-ready, for run provenance).

    CPU: bfloat16 where the CPU has native bfloat16 matrix instructions (avx512_bf16 or
    AMX, from /proc/cpuinfo and torch's CPU probe), float32 where it has not; where the
    flags cannot tell (not x86, or no flags), a one-time micro-benchmark of both decides.
    Decided once per process. GPU: float32 (fast enough, keeps the re-score window narrow).
    """
    global _CPU_CHOICE
    if torch.device(device).type != "cpu":
        return {"device": torch.device(device).type, "dtype": "float32", "reason": "GPU: float32"}
    if _CPU_CHOICE is None:
        _CPU_CHOICE = _decide_cpu()
    return dict(_CPU_CHOICE)


def candidate_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the candidate GEMM on `device` (see `candidate_dtype_report`)."""
    return getattr(torch, candidate_dtype_report(device)["dtype"])


# --- exact float64 similarity -------------------------------------------------------------


def exact_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Float64 dot products of matching rows of a and b (..., D), summed pairwise in one
    fixed order with elementwise ops only: a pair's value depends on its two vectors alone
    (bit-identical on every device, batch size and row position), and exact_dot(a, b) ==
    exact_dot(b, a). This is the similarity that defines the ranking and its ties."""
    p = a.double() * b.double()
    width = p.shape[-1]
    size = 1 << max(width - 1, 0).bit_length()
    if size != width:
        p = torch.nn.functional.pad(p, (0, size - width))  # + 0.0 changes no sum
    while size > 1:
        size //= 2
        p = p[..., :size] + p[..., size : 2 * size]
    return p[..., 0]


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Float64 rows divided by their `exact_dot` norm: equal rows stay bit-identical."""
    x = x.double()
    out = torch.empty_like(x)
    for s in range(0, len(x), ROW_CHUNK):
        part = x[s : s + ROW_CHUNK]
        out[s : s + ROW_CHUNK] = part / exact_dot(part, part).sqrt().clamp(min=1e-12)[:, None]
    return out


def _pair_dots(a: torch.Tensor, b: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor, dot=None):
    """dot(a[ia], b[ib]) (default `exact_dot`), gathered in cache-sized chunks."""
    dot = dot or exact_dot
    out = torch.empty(
        len(ia), dtype=torch.float64 if dot is exact_dot else a.dtype, device=a.device
    )
    step = PAIR_CHUNK
    for s in range(0, len(ia), step):
        out[s : s + step] = dot(
            a.index_select(0, ia[s : s + step]), b.index_select(0, ib[s : s + step])
        )
    return out


def float64_tolerance(dim: int) -> float:
    """Bound on |any float64 dot product - exact_dot| for unit vectors of dimension `dim`.

    Any summation order (a BLAS kernel, with or without FMA) is within gamma_D =
    D u / (1 - D u), u = 2^-53, of the true value |q||g| <= 1 + O(u); so two kernels are
    within 2 gamma_D of each other. Doubled for safety.
    """
    u = 2.0**-53
    return 4 * dim * u / (1 - dim * u)


def _float32_at_most(x: torch.Tensor) -> torch.Tensor:
    """float32 values <= x (float64): a threshold rounded down keeps every candidate."""
    x32 = x.float()
    return torch.where(x32.double() > x, torch.nextafter(x32, x32.new_tensor(-math.inf)), x32)


def _unit_roundoffs(dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """(u_in, u_out): GEMM input and output rounding; float32 on CUDA may run as TF32."""
    if dtype == torch.bfloat16:
        return 2.0**-8, 2.0**-8
    if dtype == torch.float32:
        if torch.get_float32_matmul_precision() == "medium":  # may run as bfloat16 inside
            return 2.0**-8, 2.0**-24
        if device.type == "cuda" or torch.get_float32_matmul_precision() == "high":
            return 2.0**-10, 2.0**-24  # TF32 (10 stored bits), perhaps truncated
        return 2.0**-24, 2.0**-24
    raise ValueError(f"no error bound for candidate dtype {dtype}")


class _Bounds:
    """Proven |s_approx - s_exact| for the candidate GEMM of unit vectors q, g.

    With e = x^ - x the rounding error of each input (computed, not estimated),
      |q^.g^ - q.g| <= |e_q . g^| + |q . e_g| <= |e_q| (1 + max|e_g|) + max|e_g|   (Cauchy-Schwarz)
    float32 accumulation over D terms adds gamma_D (1 + |e_q|)(1 + max|e_g|) with
    gamma_D = D 2^-24 / (1 - D 2^-24), and rounding the output to the GEMM's dtype adds
    u_out |v| with |v| <= |s| + eps_in. A float32 GEMM may round its inputs internally
    (TF32 on CUDA, or bfloat16 under torch.set_float32_matmul_precision("medium")): there
    the input term is the worst case 2 u_in + u_in^2 instead. A 1% safety factor and 1e-9
    absolute cover the float64 normalisation and re-score.
    """

    def __init__(self, q64, g64, q_c, g_c, dtype, device) -> None:
        u_in, self.u_out = _unit_roundoffs(dtype, device)
        dim = q64.shape[1]
        gamma = dim * 2.0**-24 / (1 - dim * 2.0**-24)
        if dtype == torch.float32 and u_in > 2.0**-24:  # rounding happens inside the GEMM
            self.eps_in = torch.full(
                (len(q64),),
                2 * u_in + u_in**2 + gamma * (1 + u_in) ** 2,
                dtype=torch.float64,
                device=device,
            )
        else:
            e_q = _error_norms(q64, q_c)
            e_g = e_q.max() if g_c is q_c else _error_norms(g64, g_c).max()
            self.eps_in = e_q * (1 + e_g) + e_g + gamma * (1 + e_q) * (1 + e_g)

    def at(self, threshold: torch.Tensor, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """eps for comparing s_approx with `threshold` (broadcast against eps_in[rows])."""
        e = self.eps_in[rows]
        while e.ndim < threshold.ndim:
            e = e[..., None]
        return (e + self.u_out * (threshold.abs().clamp(max=1) + e)) * 1.01 + 1e-9

    def widest(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        e = self.eps_in[rows]
        return (e + self.u_out * (1 + e)) * 1.01 + 1e-9


def _error_norms(x64: torch.Tensor, x_c: torch.Tensor) -> torch.Tensor:
    return torch.cat(
        [
            (x_c[s : s + ROW_CHUNK].double() - x64[s : s + ROW_CHUNK]).norm(dim=1)
            for s in range(0, len(x64), ROW_CHUNK)
        ]
    )


def _positives(q64, g64, ql, gl, same: bool):
    """Each query's positives, best first: gallery index, similarity, whether that
    similarity is `exact_dot`'s, and R.

    Returns (Q, R_max) tables padded with index -1 / similarity -inf. Similarities come
    from one small Gram matrix per class (each gallery row is read once per class rather
    than once per query), within `float64_tolerance` of `exact_dot`; positives whose Gram
    values are within twice that of another positive's are re-scored by `exact_dot`, so
    the order is exactly the tie rule's (value, then lower gallery index).
    """
    device, n_q, n_g = q64.device, len(q64), len(g64)
    g_order = torch.argsort(gl, stable=True)  # by label, then by index
    classes, g_count = torch.unique_consecutive(gl[g_order], return_counts=True)
    g_start = torch.cumsum(g_count, 0) - g_count

    q_order = torch.argsort(ql, stable=True)
    q_classes, q_count = torch.unique_consecutive(ql[q_order], return_counts=True)
    q_start = torch.cumsum(q_count, 0) - q_count
    at = torch.searchsorted(classes, q_classes).clamp(max=len(classes) - 1)
    members = torch.where(classes[at] == q_classes, g_count[at], 0)  # per query class
    width, depth = int(members.max()), int(q_count.max())
    if width == 0:
        empty = torch.zeros(n_q, 0, dtype=torch.long, device=device)
        none = torch.zeros(n_q, dtype=torch.long, device=device)
        return empty, empty.double(), empty.bool(), none

    idx = torch.full((n_q, width), -1, dtype=torch.long, device=device)
    sim = torch.full((n_q, width), -torch.inf, dtype=torch.float64, device=device)
    chunk = max(1, (1 << 21) // (max(width, depth) * q64.shape[1]))
    q_cols, g_cols = torch.arange(depth, device=device), torch.arange(width, device=device)
    for c in range(0, len(q_classes), chunk):
        part = slice(c, c + chunk)
        qi = torch.where(
            q_cols < q_count[part, None],
            q_order[(q_start[part, None] + q_cols).clamp(max=n_q - 1)],
            -1,
        )
        gi = torch.where(
            g_cols < members[part, None],
            g_order[(g_start[at[part]][:, None] + g_cols).clamp(max=n_g - 1)],
            -1,
        )
        qv = q64.index_select(0, qi.clamp(min=0).view(-1)).view(*qi.shape, -1)
        gv = g64.index_select(0, gi.clamp(min=0).view(-1)).view(*gi.shape, -1)
        gram = torch.bmm(qv, gv.transpose(1, 2))
        gram = gram.masked_fill(gi[:, None, :] < 0, -torch.inf)
        rows = qi >= 0
        sim[qi[rows]] = gram[rows]
        idx[qi[rows]] = gi[:, None, :].expand(-1, depth, -1)[rows]
    if same:  # the query is not its own positive
        self_hit = idx == torch.arange(n_q, device=device)[:, None]
        idx, sim = idx.masked_fill(self_hit, -1), sim.masked_fill(self_hit, -torch.inf)
    # columns are in ascending gallery order, so a stable sort breaks ties by index
    order = torch.argsort(sim, dim=1, descending=True, stable=True)
    ranked = sim.gather(1, order)
    near = (ranked[:, :-1] - ranked[:, 1:]) <= 2 * float64_tolerance(q64.shape[1])
    redo = torch.zeros_like(ranked, dtype=torch.bool)
    redo[:, :-1] |= near
    redo[:, 1:] |= near
    exact = torch.zeros_like(redo).scatter_(1, order, redo) & (idx >= 0)
    rows, cols = exact.nonzero(as_tuple=True)
    if len(rows):  # apart by more than 2 tolerances, Gram values order as exact_dot does
        sim[rows, cols] = _pair_dots(q64, g64, rows, idx[rows, cols])
        order = torch.argsort(sim, dim=1, descending=True, stable=True)
    num = (idx >= 0).sum(1)
    r_max = int(num.max())
    top = order[:, :r_max]
    return idx.gather(1, top), sim.gather(1, top), exact.gather(1, top), num


def _rows_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(a, b)


class _Counter:
    """Accumulates n_j from candidate entries (query, gallery item, approximate similarity).

    `pos_sim` holds the similarity of each positive that matters and +inf for the rest
    (and for padding): +inf is never beaten and never uncertain. A positive's similarity
    is `exact_dot`'s where `pos_is_exact`, else within `tol` of it.
    """

    def __init__(
        self,
        q64,
        g64,
        ql,
        gl,
        pos_idx,
        pos_exact,
        pos_is_exact,
        num_pos,
        bounds: _Bounds,
        n_pad: int,
        max_rank: int,
    ):
        self.max_rank = max_rank
        self.q64, self.g64, self.ql, self.gl = q64, g64, ql, gl
        self.q32 = q64.float()
        self.g32 = self.q32 if g64 is q64 else g64.float()
        # float32 re-score: inputs rounded (2^-24 each) and D-term accumulation (gamma_D)
        dim = q64.shape[1]
        gamma = dim * 2.0**-24 / (1 - dim * 2.0**-24)
        self.tol = float64_tolerance(dim)
        self.eps32 = (
            (2 * 2.0**-24 + 2.0**-48 + gamma * (1 + 2.0**-24) ** 2) * 1.01 + 1e-12 + 2 * self.tol
        )
        self.pos_is_exact = pos_is_exact
        self.pos_idx, self.pos_exact, self.num_pos, self.bounds = (
            pos_idx,
            pos_exact,
            num_pos,
            bounds,
        )
        self.pos_sim = torch.full(pos_idx.shape, torch.inf, dtype=torch.float64, device=q64.device)
        self.eps = torch.zeros_like(self.pos_sim)
        self.matters = pos_idx >= 0
        self.counts = torch.zeros_like(pos_idx)
        # lower bounds on the best negatives seen so far, for the (R+1)-th best bound L
        self.best_neg = torch.full(
            (len(q64), pos_idx.shape[1] + 1), -torch.inf, dtype=torch.float64, device=q64.device
        )
        # a proven lower bound on the (R+1)-th best similarity from any items (`floor`)
        self.floor_bound = torch.full(
            (len(q64),), -torch.inf, dtype=torch.float64, device=q64.device
        )
        self.lo = torch.full((n_pad,), torch.inf, device=q64.device)  # candidate threshold
        self.candidates = self.rescored = self.dense_entries = 0
        self._ids = None  # distinct-vector ids (`_distinct_ids`), made on first need
        # every query gets its threshold from its positives before any block is scanned
        self._settle(torch.arange(len(q64), device=q64.device))

    def learn(self, q: torch.Tensor, lower: torch.Tensor) -> None:
        """Merge proven lower bounds of (distinct, not yet seen) negatives; tighten lo.

        L = (R+1)-th best of {exact positives} and these bounds is a lower bound on the
        (R+1)-th best similarity. A positive below L ranks beyond R + 1: it stops mattering
        (it never matters again, as L only grows). The best positive keeps mattering
        until its rank is known to exceed `max_rank` (see `_retire_deep`).
        """
        width = self.best_neg.shape[1]
        # a bound at or below the width-th one kept changes no top-width list: skip it
        better = lower > self.best_neg[:, -1].index_select(0, q)
        q, lower = q[better], lower[better]
        if len(q) == 0:
            return
        order = torch.argsort(lower, descending=True, stable=True)
        order = order[torch.argsort(q[order], stable=True)]  # by query, best first
        q, lower = q[order], lower[order]
        rows, counts = torch.unique_consecutive(q, return_counts=True)
        rank = torch.arange(len(q), device=q.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts
        )
        keep = rank < width
        fresh = torch.full((len(rows), width), -torch.inf, dtype=torch.float64, device=q.device)
        fresh[
            torch.repeat_interleave(torch.arange(len(rows), device=q.device), counts)[keep],
            rank[keep],
        ] = lower[keep]
        merged = torch.cat([self.best_neg.index_select(0, rows), fresh], 1)
        self.best_neg[rows] = merged.topk(width, dim=1).values
        self._settle(rows)

    def floor(self, rows: torch.Tensor, bound: torch.Tensor) -> None:
        """Raise rows' lower bound on their (R+1)-th best similarity to `bound` (proven by
        R + 2 distinct items at or above it, the query itself possibly among them)."""
        self.floor_bound[rows] = torch.maximum(self.floor_bound[rows], bound)
        self._settle(rows)

    def _settle(self, rows: torch.Tensor) -> None:
        """Retire the rows' positives below their bound L; recompute eps and lo."""
        pos = self.pos_exact.index_select(0, rows)
        known = torch.cat([pos, self.best_neg.index_select(0, rows)], 1)
        known = known.sort(dim=1, descending=True).values
        bound = known.gather(1, self.num_pos.index_select(0, rows)[:, None])
        bound = torch.maximum(bound, self.floor_bound.index_select(0, rows)[:, None])
        was = self.matters.index_select(0, rows)
        matters = was & (pos >= bound)
        matters[:, 0] = was[:, 0]  # only `_retire_deep` drops the best one
        self.matters[rows] = matters
        pos_sim = torch.where(matters, pos, torch.inf)
        eps = self.bounds.at(torch.where(matters, pos, 0), rows)
        self.pos_sim[rows], self.eps[rows] = pos_sim, eps
        lo = torch.where(matters, pos_sim - eps, torch.inf).amin(1)
        self.lo[rows] = _float32_at_most(lo)

    def add(self, q: torch.Tensor, g: torch.Tensor, approx: torch.Tensor) -> None:
        # drops the query itself and its positives
        negative = self.gl.index_select(0, g) != self.ql.index_select(0, q)
        q, g, approx = q[negative], g[negative], approx[negative].double()
        self.candidates += len(q)
        for s in range(0, len(q), ENTRY_CHUNK):
            self._add(q[s : s + ENTRY_CHUNK], g[s : s + ENTRY_CHUNK], approx[s : s + ENTRY_CHUNK])
        # only after counting: `learn` may retire positives these entries beat
        self.learn(q, approx - self.bounds.widest(q))

    def _add(self, q, g, approx) -> None:
        p_sim, eps = self.pos_sim.index_select(0, q), self.eps.index_select(0, q)
        above = approx[:, None] > p_sim + eps
        unsure = ~above & (approx[:, None] >= p_sim - eps)
        rows = unsure.any(1).nonzero().squeeze(1)
        if len(rows):  # float32 first (half the memory traffic), float64 within its bound
            self.rescored += len(rows)
            qr, gr = q[rows], g[rows]
            ps, unsure = p_sim[rows], unsure[rows]
            s32 = _pair_dots(self.q32, self.g32, qr, gr, _rows_dot).double()[:, None]
            beats = s32 > ps + self.eps32
            close = unsure & ~beats & (s32 >= ps - self.eps32)
            tight = close.any(1).nonzero().squeeze(1)
            if len(tight):
                qt, gt = qr[tight], gr[tight]
                s64 = _pair_dots(self.q64, self.g64, qt, gt)[:, None]
                pt, pi = ps[tight], self.pos_idx.index_select(0, qt)
                # a Gram value (not exact_dot's) decides unless within tol: re-score those
                redo = close[tight] & ~self.pos_is_exact.index_select(0, qt)
                redo &= (s64 - pt).abs() <= self.tol
                r, c = redo.nonzero(as_tuple=True)
                if len(r):
                    pt = pt.clone()
                    pt[r, c] = _pair_dots(self.q64, self.g64, qt[r], pi[r, c])
                exact = (s64 > pt) | ((s64 == pt) & (gt[:, None] < pi))
                beats[tight] = torch.where(close[tight], exact, beats[tight])
            above[rows] = torch.where(unsure, beats, above[rows])
        self.counts.index_add_(0, q, above.long())
        self._retire_deep(torch.unique(q))

    def _retire_deep(self, rows: torch.Tensor) -> None:
        """Once n_1 reaches max_rank, every positive of the query ranks beyond any K
        asked for and beyond R + 1 (max_rank > R_max): stop counting for it."""
        deep = rows[self.counts[rows, 0] >= self.max_rank]
        if len(deep):
            self.matters[deep] = False
            self.pos_sim[deep] = torch.inf
            self.lo[deep] = torch.inf

    # --- the dense path: cost = a float32 GEMM and a few comparisons per entry ---------

    def add_dense(self, side: _Dense) -> None:
        """Count queries q0..q1 against every gallery item g0..g1 without candidate lists.

        Per chunk of queries that still have a positive that matters: a float32 GEMM
        (float64 where float32 matmuls may round inside: TF32 / bfloat16 precision
        settings), within `eps` of `exact_dot`; the positives' similarities made exact;
        every negative within eps of a positive that matters re-scored by `exact_dot`
        (once per distinct pair of vectors: duplicated embeddings cost one). Entries
        outside every window differ from each positive by more than the error, so their
        approximate value orders like the exact one; entries inside are compared exactly,
        ties by the lower gallery index. The cost per entry is the GEMM's and a few
        comparisons per positive that matters, whatever the embeddings look like.
        """
        device = self.q64.device
        rows = torch.arange(side.q0, side.q1, device=device)
        rows = rows[self.matters.index_select(0, rows).any(1)]
        cols = side.g1 - side.g0
        if len(rows) == 0 or cols <= 0:
            return
        self._exact_positives(rows)
        rows = rows[self.matters.index_select(0, rows).any(1)]  # `_settle` may retire some
        fp32 = torch.get_float32_matmul_precision() == "highest"
        g = (self.g32 if fp32 else self.g64)[side.g0 : side.g1]
        eps = self.eps32 if fp32 else self.tol
        g_labels = self.gl[side.g0 : side.g1]
        g_index = torch.arange(side.g0, side.g1, device=device)
        step = max(1, DENSE_CHUNK // cols)
        for s in range(0, len(rows), step):
            r = rows[s : s + step]
            negative = g_labels[None, :] != self.ql.index_select(0, r)[:, None]
            p_sim = self.pos_sim.index_select(0, r)  # +inf where a positive does not matter
            p_idx = self.pos_idx.index_select(0, r)
            live = self.matters.index_select(0, r).any(0).nonzero().squeeze(1).tolist()
            counts = torch.zeros(len(r), p_sim.shape[1], dtype=torch.long, device=device)
            sim = self._exact_grid(r, side.g0, side.g1)
            if sim is not None:  # few distinct vectors (collapse): every entry exact, cheaply
                sim.masked_fill_(~negative, -torch.inf)
                for c in live:
                    p, pi = p_sim[:, c : c + 1], p_idx[:, c : c + 1]
                    beats = (sim > p) | ((sim == p) & (g_index[None, :] < pi))
                    counts[:, c] = beats.sum(1)
                self._count_chunk(r, sim, counts, cols, eps)
                continue
            sim = ((self.q32 if fp32 else self.q64).index_select(0, r) @ g.T).double()
            sim.masked_fill_(~negative, -torch.inf)  # never counted, never near
            near = torch.zeros_like(negative)
            for c in live:  # beyond eps above a positive: certainly beats it
                p = p_sim[:, c : c + 1]
                counts[:, c] = (sim > p + eps).sum(1)
                near |= (sim >= p - eps) & (sim <= p + eps)
            n_near = int(near.sum())
            if n_near > sim.numel() // 4:  # mostly ties (collapse): whole-chunk passes
                approx = sim.clone()
                self._make_exact(sim, near, r, side.g0)
                for c in live:
                    p, pi = p_sim[:, c : c + 1], p_idx[:, c : c + 1]
                    window = (approx >= p - eps) & (approx <= p + eps)
                    beats = (sim > p) | ((sim == p) & (g_index[None, :] < pi))
                    counts[:, c] += (window & beats).sum(1)
            elif n_near:  # within eps of a positive: decided by exact_dot and the tie rule
                qi, gi = near.nonzero(as_tuple=True)  # negatives only: the others are -inf
                approx = sim[qi, gi]
                self._make_exact(sim, near, r, side.g0)
                exact, g_at = sim[qi, gi], gi + side.g0
                for c in live:
                    p, pi = p_sim[qi, c], p_idx[qi, c]
                    window = (approx >= p - eps) & (approx <= p + eps)
                    beats = window & ((exact > p) | ((exact == p) & (g_at < pi)))
                    counts[:, c] += torch.bincount(qi[beats], minlength=len(r))
            self._count_chunk(r, sim, counts, cols, eps)

    def _count_chunk(self, r, sim, counts, cols: int, eps: float) -> None:
        """Add a dense chunk's counts; its best negatives tighten L (after counting)."""
        self.counts.index_add_(0, r, counts)
        # candidates: the entries the filter would have passed (the work is all of them)
        lo = self.lo.index_select(0, r).double()[:, None]
        self.candidates += int((sim >= lo).sum())
        self.dense_entries += sim.numel()
        top = min(self.best_neg.shape[1], cols)
        best = sim.topk(top, dim=1).values
        self.learn(r.repeat_interleave(top), (best - eps).view(-1))
        self._retire_deep(r)

    def _exact_grid(self, r, g0: int, g1: int) -> torch.Tensor | None:
        """exact_dot of queries r against gallery items g0..g1 when they hold few distinct
        vectors (at most a quarter as many pairs as entries), else None."""
        (q_id, _), (g_id, _) = self._distinct()
        uq, inv_q = torch.unique(q_id[r], return_inverse=True)
        ug, inv_g = torch.unique(g_id[g0:g1], return_inverse=True)
        if 4 * len(uq) * len(ug) > len(r) * (g1 - g0):
            return None
        grid = self._exact_ids(uq.repeat_interleave(len(ug)), ug.repeat(len(uq)))
        return grid.view(len(uq), len(ug)).index_select(0, inv_q).index_select(1, inv_g)

    def _make_exact(self, sim, near, r, g0: int) -> None:
        """sim[near] = exact_dot of those pairs (queries r, gallery items g0..). Where the
        near entries' rows and columns hold few distinct vectors (duplicates, collapse),
        one exact_dot per distinct pair of vectors, gathered densely; else per entry."""
        (q_id, _), (g_id, _) = self._distinct()
        rows_n, cols_n = near.any(1), near.any(0)
        uq, inv_q = torch.unique(q_id[r[rows_n]], return_inverse=True)
        cols = cols_n.nonzero().squeeze(1)
        ug, inv_g = torch.unique(g_id[cols + g0], return_inverse=True)
        if len(uq) * len(ug) <= int(near.sum()):
            grid = self._exact_ids(uq.repeat_interleave(len(ug)), ug.repeat(len(uq)))
            grid = grid.view(len(uq), len(ug))
            row_at = torch.zeros(len(r), dtype=torch.long, device=r.device)
            row_at[rows_n] = inv_q
            col_at = torch.zeros(sim.shape[1], dtype=torch.long, device=r.device)
            col_at[cols] = inv_g
            exact = grid.index_select(0, row_at).index_select(1, col_at)
            torch.where(near, exact, sim, out=sim)
        else:
            qi, gi = near.nonzero(as_tuple=True)
            sim[qi, gi] = self._exact_pairs(r[qi], gi + g0)

    def _distinct(self):
        if self._ids is None:
            q_ids = _distinct_ids(self.q64)
            self._ids = (q_ids, q_ids if self.g64 is self.q64 else _distinct_ids(self.g64))
        return self._ids

    def _exact_ids(self, qa: torch.Tensor, ga: torch.Tensor) -> torch.Tensor:
        """exact_dot of the representatives of distinct-vector ids qa, ga."""
        (_, q_rep), (_, g_rep) = self._distinct()
        self.rescored += len(qa)
        return _pair_dots(self.q64, self.g64, q_rep[qa], g_rep[ga])

    def _exact_positives(self, rows: torch.Tensor) -> None:
        """Replace the rows' Gram similarities of positives that matter by `exact_dot`'s
        (their order is unchanged: Gram values this far apart order as exact ones)."""
        todo = self.matters.index_select(0, rows) & ~self.pos_is_exact.index_select(0, rows)
        r, c = todo.nonzero(as_tuple=True)
        if len(r) == 0:
            return
        q = rows[r]
        self.pos_exact[q, c] = _pair_dots(self.q64, self.g64, q, self.pos_idx[q, c])
        self.pos_is_exact[q, c] = True
        self.rescored += len(q)
        self._settle(rows)

    def _exact_pairs(self, qi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
        """exact_dot(q64[qi], g64[gi]), computed once per distinct pair of vectors."""
        (q_id, _), (g_id, g_rep) = self._distinct()
        key = q_id.index_select(0, qi) * len(g_rep) + g_id.index_select(0, gi)
        pairs, where = torch.unique(key, return_inverse=True)
        values = self._exact_ids(pairs // len(g_rep), pairs % len(g_rep))
        return values.index_select(0, where)


def _distinct_ids(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(id per row, a representative row per id): rows with equal values share an id,
    so their `exact_dot` with any vector is equal too. Grouped by an `exact_dot` hash
    with a fixed random vector, then checked against the group's first row: a row that
    only collides gets an id of its own (never a wrong merge)."""
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(x.shape[1], generator=gen, dtype=torch.float64).to(x.device)
    hashes = torch.cat(
        [exact_dot(x[s : s + ROW_CHUNK], probe) for s in range(0, len(x), ROW_CHUNK)]
    )
    _, group = torch.unique(hashes, return_inverse=True)
    index = torch.arange(len(x), device=x.device)
    first = torch.full((len(x),), len(x), device=x.device).scatter_reduce(0, group, index, "amin")
    rep = first.index_select(0, group)
    same = torch.cat(
        [
            (x[s : s + ROW_CHUNK] == x.index_select(0, rep[s : s + ROW_CHUNK])).all(1)
            for s in range(0, len(x), ROW_CHUNK)
        ]
    )
    # ids: a group's first row's position among the representatives, loners after them
    own = ~same
    keep = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    keep[rep[same]] = True
    keep |= own
    reps = index[keep]
    slot = torch.full((len(x),), -1, device=x.device)
    slot[reps] = torch.arange(len(reps), device=x.device)
    ids = torch.where(same, slot.index_select(0, rep), slot)
    return ids, reps


def _sortable_bits(block: torch.Tensor) -> torch.Tensor:
    """A view whose integer order equals the value order for values >= 0.

    bfloat16 bit patterns read as int16 order non-negative values correctly and put all
    negative values below them; max-pooling the bits is a cheap exact filter for
    thresholds > 0 (float32 blocks are compared as they are).
    """
    return block.view(torch.int16) if block.dtype == torch.bfloat16 else block


def _bits_value(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 values of `_sortable_bits` entries."""
    return bits.view(dtype).float() if dtype == torch.bfloat16 else bits


def _threshold_bits(lo: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`lo` in the units of `_sortable_bits`, rounded down; lo <= 0 passes every segment."""
    if dtype != torch.bfloat16:
        return lo
    top = (lo.float().clamp(max=1e30).view(torch.int32) >> 16).to(
        torch.int16
    )  # truncates: rounds down
    return torch.where(lo > 0, top, torch.iinfo(torch.int16).min).masked_fill(lo.isinf(), 32767)


def _explodes(passing: int, lo: torch.Tensor, runs_per_query: int, share: float) -> bool:
    """Whether `passing` runs exceed `share` of the runs of the queries still counting
    (finite lo): the dense path's work is those queries' entries."""
    return passing > share * int(lo.isfinite().sum()) * runs_per_query


def _padded(x: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = (-len(x)) % multiple
    return torch.cat([x, x.new_zeros(extra, x.shape[1])]) if extra else x


class _Block:
    """One block of the candidate GEMM (rows i.., columns j..), computed one column tile
    at a time so each (rows x tile) output is max-pooled while still in cache; candidates
    are then taken from the whole block at once (a few ops per block, not per tile: on
    CPU the per-op overhead of small tiles cost more than the filter's arithmetic).

    `compute` fills `sim` (tiles, rows, tile) with the similarities, `row_max` (tiles,
    rows, tile / SEGMENT) with the maxima over SEGMENT-wide column runs and, if asked,
    `col_max` (tiles, rows / COLUMN_RUN, tile) with the maxima over COLUMN_RUN-tall runs,
    all in `_sortable_bits` order. `stream` = `compute` + the candidates of both sides.
    """

    def __init__(self, rows: int, cols: int, tile: int, dtype, device, run: int) -> None:
        bits = torch.int16 if dtype == torch.bfloat16 else dtype
        self.tile, self.shape, self.run_width = tile, (rows, cols), run
        self.dtype, self.bits = dtype, bits
        self._sim = torch.empty(rows * cols, dtype=dtype, device=device)
        self._row_max = torch.empty(rows * cols // SEGMENT, dtype=bits, device=device)
        self._col_max = torch.empty(rows * cols // COLUMN_RUN, dtype=bits, device=device)
        self._run_max = None  # narrower runs for `least_of_best` (first blocks)
        self.run = torch.arange(SEGMENT, device=device)
        self.sim = self.row_max = self.col_max = self.run_max = None

    def stream(self, q, g, lo_rows, lo_cols=None, dense_share=None) -> list:
        """Candidates of the block: [(row, col, value)] for the rows' queries and, with
        `lo_cols` (the transposed block), [(col, row, value)] for the columns' queries,
        in block coordinates. `lo_rows` / `lo_cols`: callables giving the thresholds,
        read after the GEMMs (lo only rises, so a later snapshot is tighter). A side
        whose candidates would explode is None (see `row_candidates`)."""
        self.compute(q, g, cols=lo_cols is not None, runs=False)
        out = [self.row_candidates(lo_rows(), dense_share)]
        if lo_cols is not None:
            out.append(self.col_candidates(lo_cols(), dense_share))
        return out

    def compute(self, q: torch.Tensor, g: torch.Tensor, cols: bool = False, runs=True) -> None:
        """The whole block with its run maxima (and, with `runs`, maxima over
        `run_width`-wide column runs for `least_of_best`)."""
        rows, tile, run = len(q), self.tile, self.run_width
        runs = runs and run != SEGMENT
        if runs and self._run_max is None:
            (full_rows, full_cols), device = self.shape, self._sim.device
            shape = (full_cols // tile, full_rows, tile // run)
            self._run_max = torch.empty(shape, dtype=self.bits, device=device)
        tiles = len(g) // tile
        n = tiles * rows * tile
        self.sim = self._sim[:n].view(tiles, rows, tile)
        self.row_max = self._row_max[: n // SEGMENT].view(tiles, rows, tile // SEGMENT)
        self.col_max = self._col_max[: n // COLUMN_RUN].view(tiles, rows // COLUMN_RUN, tile)
        for t in range(tiles):
            torch.mm(q, g[t * tile : (t + 1) * tile].T, out=self.sim[t])
            bits = _sortable_bits(self.sim[t])
            torch.amax(bits.view(rows, tile // SEGMENT, SEGMENT), 2, out=self.row_max[t])
            if cols:
                column_runs = bits.view(rows // COLUMN_RUN, COLUMN_RUN, tile)
                torch.amax(column_runs, 1, out=self.col_max[t])
            if runs:
                self._run_max[t, :rows] = bits.view(rows, tile // run, run).amax(2)
        self.run_max = self._run_max[:tiles, :rows] if runs else None

    def row_candidates(self, lo: torch.Tensor, dense_share: float | None = None):
        """(row, col, value) of the entries with value >= lo[row]; None (nothing
        extracted) when more than `dense_share` of the runs of the rows still counting
        could hold one: the caller then counts those rows densely (`_Counter.add_dense`),
        at a cost per entry of those rows, not per candidate."""
        tiles, rows, tile = self.sim.shape
        th = _threshold_bits(lo, self.sim.dtype)
        t, r, k = (self.row_max >= th[None, :, None]).nonzero(as_tuple=True)
        if dense_share is not None and _explodes(len(t), lo, tiles * tile // SEGMENT, dense_share):
            return None
        run_id = (t * rows + r) * (tile // SEGMENT) + k  # runs are contiguous in `sim`
        runs = _sortable_bits(self.sim).view(-1, SEGMENT).index_select(0, run_id)
        # the runs' bits against the threshold's bits (a superset), one nonzero; values
        # only for the few that pass
        i, off = (runs >= th.index_select(0, r)[:, None]).nonzero(as_tuple=True)
        r, col = r[i], t[i] * tile + k[i] * SEGMENT + off
        vals = _bits_value(runs[i, off], self.sim.dtype)
        keep = vals >= lo.index_select(0, r)
        return r[keep], col[keep], vals[keep]

    def col_candidates(self, lo: torch.Tensor, dense_share: float | None = None):
        """(col, row, value) of the entries with value >= lo[col] (`compute(cols=True)`);
        None as in `row_candidates`."""
        tiles, rows, tile = self.sim.shape
        th = _threshold_bits(lo, self.sim.dtype)
        t, k, c = (self.col_max >= th.view(tiles, 1, tile)).nonzero(as_tuple=True)
        if dense_share is not None and _explodes(len(t), lo, rows // COLUMN_RUN, dense_share):
            return None
        col = t * tile + c
        run = self.run[:COLUMN_RUN]
        at = ((t * rows)[:, None] + k[:, None] * COLUMN_RUN + run) * tile + c[:, None]
        runs = torch.take(_sortable_bits(self.sim), at)  # strided runs: take
        i, off = (runs >= th.index_select(0, col)[:, None]).nonzero(as_tuple=True)
        col, row = col[i], k[i] * COLUMN_RUN + off
        vals = _bits_value(runs[i, off], self.sim.dtype)
        keep = vals >= lo.index_select(0, col)
        return col[keep], row[keep], vals[keep]

    def least_of_best(self, need: torch.Tensor, real_cols: int) -> torch.Tensor:
        """Per row (the first len(need)): the largest value v >= 0 such that `need` of its
        column runs (`run_width` wide, distinct items) have a maximum >= v, i.e. `need`
        distinct items are at least v similar; -inf where no such v. Runs reaching past
        `real_cols` (padding) are left out. Bisection on the bits: no per-row sort."""
        width = self.run_width
        runs = self.row_max if width == SEGMENT else self.run_max
        runs = runs[:, : len(need)].permute(1, 0, 2).reshape(len(need), -1)
        if runs.dtype == torch.float32:
            runs = runs.view(torch.int32)  # non-negative floats order as their bits
        valid = (torch.arange(runs.shape[1], device=runs.device) + 1) * width <= real_cols
        runs = runs.masked_fill(~valid, -1)  # negative bits: negative values, never counted
        need = need[:, None]
        low = torch.zeros_like(runs[:, :1])  # invariant: count(runs >= low) >= need
        high = runs.amax(1, keepdim=True).clamp(min=0) + 1  # count(runs >= high) == 0
        found = (runs >= 0).sum(1, keepdim=True) >= need
        for _ in range(32 if runs.dtype == torch.int32 else 16):
            mid = low + (high - low) // 2
            ok = (runs >= mid).sum(1, keepdim=True) >= need
            low, high = torch.where(ok, mid, low), torch.where(ok, high, mid)
        value = low.view(torch.bfloat16 if low.dtype == torch.int16 else torch.float32)
        return torch.where(found, value.double(), -torch.inf)[:, 0]


def rank_positives(*args, **kwargs) -> PositiveRanks:
    """Exact n_j (negatives ranked above each positive) for every query.

    Arguments as `_rank_positives`. Every op runs single-threaded: with two threads on a
    busy machine OpenMP regions spin-wait and cost more than the work (measured: 7x
    slower overall on 2 shared cores, 10x on 256-column GEMM tiles); the blocks are
    spread over `workers` Python threads instead.
    """
    with single_threaded() as threads:
        return _rank_positives(*args, threads=kwargs.pop("threads", threads), **kwargs)


@contextlib.contextmanager
def single_threaded():
    """Run torch ops on one thread inside; yields the thread count the caller had (the
    outermost one when nested), restored on exit."""
    global _CALLER_THREADS
    before, saved = torch.get_num_threads(), _CALLER_THREADS
    _CALLER_THREADS = saved or before
    torch.set_num_threads(1)
    try:
        yield _CALLER_THREADS
    finally:
        torch.set_num_threads(before)
        _CALLER_THREADS = saved


_CALLER_THREADS: int | None = None  # set while inside `single_threaded`


def _rank_positives(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor | None = None,
    gallery_labels: torch.Tensor | None = None,
    candidate: torch.dtype | None = None,
    block: int = BLOCK,
    max_rank: int | None = None,
    threads: int = 1,
    tile: int | None = None,
    workers: int | None = None,
    dense: bool | None = None,
) -> PositiveRanks:
    """Exact n_j (negatives ranked above each positive) for every query.

    Without a gallery the queries are their own gallery and each query is left out of its
    own neighbours. Embeddings need not be normalised; labels are integers. `candidate`
    overrides the candidate GEMM dtype; `block` the block size and `tile` the GEMM's
    column tile (tests use small ones); `workers` the threads computing blocks (default:
    torch's thread count on CPU, 1 on GPU).
    `max_rank` (e.g. the largest Recall@K): a query whose best positive ranks deeper is
    reported as "beyond" for every positive, which bounds the work on poor embeddings.
    `dense`: None counts a block side densely when its candidates would explode
    (`DENSE_SHARE`), True always, False never (tests compare the paths).
    """
    same = gallery is None
    device = queries.device
    q64 = unit_rows(queries)
    g64 = q64 if same else unit_rows(gallery)
    ql = query_labels.long().to(device)
    gl = ql if same else gallery_labels.long().to(device)
    n_q, n_g = len(q64), len(g64)

    pos_idx, pos_sim, pos_is_exact, num_pos = _positives(q64, g64, ql, gl, same)
    if pos_idx.shape[1] == 0:  # only lone queries: nothing to rank
        return PositiveRanks(num_pos, pos_idx.clone())
    dtype = candidate or candidate_dtype(device)
    # CPU: narrow column tiles keep each GEMM output in cache for the filter; GPU: one tile
    tile = min(tile or (TILE if device.type == "cpu" else block), block)
    tile = max(SEGMENT, tile // SEGMENT * SEGMENT)
    block = max(tile, block // tile * tile)
    qc = _padded(q64.to(dtype), tile)
    gc = qc if same else _padded(g64.to(dtype), tile)
    q_c = qc[:n_q]
    bounds = _Bounds(q64, g64, q_c, q_c if same else gc[:n_g], dtype, device)

    cap = max(max_rank or n_g, pos_idx.shape[1] + 1)  # beyond R + 1 too
    counter = _Counter(
        q64, g64, ql, gl, pos_idx, pos_sim, pos_is_exact, num_pos, bounds, len(qc), cap
    )
    lo = counter.lo
    # first blocks: column runs narrow enough that R + 2 of them are a small part of a row
    need_max = pos_idx.shape[1] + 2
    run = SEGMENT
    while run > 1 and block // run < 2 * need_max:
        run //= 2
    if workers is None:  # beyond a few, the counting thread is the bottleneck anyway
        workers = min(threads, MAX_WORKERS) if device.type == "cpu" else 1
    workers = max(1, workers)
    free: queue.SimpleQueue[_Block] = queue.SimpleQueue()  # one per job in flight
    for _ in range(workers + 1 if workers > 1 else 1):
        free.put(_Block(block, block, tile, dtype, device, run))
    share = {None: DENSE_SHARE, True: -1.0, False: None}[dense]

    def work(job: tuple[int, int, bool, bool]):
        """Compute one block; extract its candidates unless it is a first block (those
        need their bound L first, which only the counting thread may set)."""
        i, j, both_sides, first = job
        rows = min(block, len(qc) - i)
        blk = free.get()
        try:
            if first:  # the counting thread takes the block and puts it back
                blk.compute(qc[i : i + rows], gc[j : j + block])
                done, blk = blk, None
                return done
            # lo only rises: a snapshot is a valid (looser) threshold
            g = gc[j : j + block]
            lo_cols = (lambda: lo[j : j + len(g)].clone()) if both_sides else None
            lo_rows = lambda: lo[i : i + rows].clone()  # noqa: E731
            found = blk.stream(qc[i : i + rows], g, lo_rows, lo_cols, share)
            return _in_dataset(found, i, j, n_q, n_g, rows, len(g))
        finally:
            if blk is not None:
                free.put(blk)

    # Diagonal blocks (or the first gallery block) first, row side only: they give each
    # query its first bound L; every later block's candidates tighten it (each item once).
    jobs = [(i, i if same else 0, False, True) for i in range(0, n_q, block)]
    jobs += [
        (i, j, same, False)
        for i in range(0, n_q, block)
        for j in range(i + block if same else block, len(gc), block)
    ]
    for (i, j, _, first), done in zip(jobs, _in_order(work, jobs, workers)):
        if first:  # a first bound L from the block's best runs (R + 2: the query may be one)
            blk = done
            real = min(blk.sim.shape[1], n_q - i)
            q_rows = torch.arange(i, i + real, device=device)
            least = blk.least_of_best(num_pos[i : i + real] + 2, n_g - j)
            counter.floor(q_rows, least - bounds.widest(q_rows))
            rows = len(blk.sim[0])
            found = [blk.row_candidates(lo[i : i + rows], share)]
            done = _in_dataset(found, i, j, n_q, n_g, rows, blk.sim.shape[0] * blk.tile)
            free.put(blk)
        for item in done:
            if isinstance(item, _Dense):
                counter.add_dense(item)
            else:
                counter.add(*item)

    counts = counter.counts.masked_fill(~counter.matters, n_g)
    return PositiveRanks(
        num_pos, counts, counter.candidates, counter.rescored, counter.dense_entries
    )


@dataclass
class _Dense:
    """A block side to count densely: queries q0..q1 against gallery items g0..g1."""

    q0: int
    q1: int
    g0: int
    g1: int


def _in_dataset(found: list, i: int, j: int, n_q: int, n_g: int, rows: int, cols: int) -> list:
    """Block candidates [(row, col, v)] and, if present, [(col, row, v)] as (query,
    gallery item, v) in dataset indices; padding columns/rows dropped. A side given as
    None (its candidates exploded) becomes a `_Dense` range."""
    out = []
    if found[0] is None:
        out.append(_Dense(i, min(i + rows, n_q), j, min(j + cols, n_g)))
    else:
        r, c, v = found[0]
        ok = c + j < n_g
        out.append((r[ok] + i, c[ok] + j, v[ok]))
    if len(found) > 1:  # the transposed block: queries j..., gallery items i...
        if found[1] is None:
            out.append(_Dense(j, min(j + cols, n_q), i, min(i + rows, n_g)))
        else:
            c, r, v = found[1]
            ok = r + i < n_g
            out.append((c[ok] + j, r[ok] + i, v[ok]))
    return out


def _in_order(work, jobs, workers: int):
    """work(job) for each job, yielded in job order. With workers > 1, that many threads
    run ahead (torch ops release the GIL; each thread's ops are single-threaded, which
    beats OpenMP's barriers on small GEMMs), at most workers + 1 jobs in flight."""
    if workers <= 1:
        yield from map(work, jobs)
        return
    # inference mode is thread-local, and the caller's buffers (Lightning evaluates under
    # it) may only be written in it: every worker runs in the caller's mode
    inference = torch.is_inference_mode_enabled()

    def in_callers_mode(job):
        with torch.inference_mode(inference):
            return work(job)

    pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,))
    try:
        pending: collections.deque = collections.deque()
        for job in jobs:
            if len(pending) > workers:
                yield pending.popleft().result()
            pending.append(pool.submit(in_callers_mode, job))
        while pending:
            yield pending.popleft().result()
    finally:  # on an error (or an abandoned generator) run nothing more
        pool.shutdown(wait=True, cancel_futures=True)
