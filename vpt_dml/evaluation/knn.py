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

"Exact": similarities are float64 dot products of float64-normalised embeddings; equal
similarities are ordered by the lower gallery index. Every count equals what a float64
brute-force sort with that tie-break gives.

Speed: the all-pairs similarity pass runs in reduced precision (bfloat16 on CPU, float32
on GPU) and only proposes candidates. `_Bounds` gives a proven eps with
|s_approx - s_exact| <= eps for every pair (per query, and growing with |s|). A negative
more than eps above (below) a positive's exact similarity certainly beats (loses to) it;
anything within eps is re-scored: in float32 (bound gamma_D ~ 3e-5 for D = 512), and
in float64 only if still within that bound. A negative matters only if it could beat a
positive that matters, so candidates are the entries with s_approx >= lo (per query); a
max-pool over 64-wide column segments finds them without another full pass. When the
query set is its own gallery the matrix is symmetric: only blocks on and above the
diagonal are computed and each off-diagonal block serves its rows and its columns. The
diagonal blocks go first; their best negatives give each query its first bound L, and
the candidates of every later block tighten it (lo rises, deep positives retire).
Memory stays bounded by the block size, whatever the embeddings look like; badly
separated embeddings (an untrained model) only make more candidates, hence slower.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SEGMENT = 64  # column segment width of the max-pool candidate filter
BLOCK = 4096  # rows and columns per similarity block (rounded to a multiple of SEGMENT)
ENTRY_CHUNK = 1 << 19  # candidate entries compared against the positives at a time
ROW_CHUNK = 4096  # rows per float64 helper computation


@dataclass
class PositiveRanks:
    """Per query: R and n_j (negatives ranked above the j-th best positive)."""

    num_positives: torch.Tensor  # (Q,)
    negatives_above: torch.Tensor  # (Q, R_max) int64; "beyond R + 1" positives hold len(gallery)
    candidates: int = 0  # candidate entries examined
    rescored: int = 0  # of those, re-scored exactly (float32, then float64 if needed)


def candidate_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CPUs where oneDNN runs it natively (about 2x float32 GEMM speed on
    AVX512-BF16), float32 elsewhere: GPUs are fast enough and keep the window narrow."""
    if device.type != "cpu":
        return torch.float32
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return torch.bfloat16 if native else torch.float32


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
    """Each query's positives, best first: gallery index, exact similarity, and R.

    Returns (Q, R_max) tables padded with index -1 / similarity -inf. Ties are ordered
    by the lower gallery index. Similarities come from one small Gram matrix per class,
    so each gallery row is read once per class rather than once per query.
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
        return empty, empty.double(), torch.zeros(n_q, dtype=torch.long, device=device)

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
        gram = torch.bmm(q64[qi.clamp(min=0)], g64[gi.clamp(min=0)].transpose(1, 2))
        gram = gram.masked_fill(gi[:, None, :] < 0, -torch.inf)
        rows = qi >= 0
        sim[qi[rows]] = gram[rows]
        idx[qi[rows]] = gi[:, None, :].expand(-1, depth, -1)[rows]
    if same:  # the query is not its own positive
        self_hit = idx == torch.arange(n_q, device=device)[:, None]
        idx, sim = idx.masked_fill(self_hit, -1), sim.masked_fill(self_hit, -torch.inf)
    # columns are in ascending gallery order, so a stable sort breaks ties by index
    order = torch.argsort(sim, dim=1, descending=True, stable=True)
    num = (idx >= 0).sum(1)
    r_max = int(num.max())
    return idx.gather(1, order)[:, :r_max], sim.gather(1, order)[:, :r_max], num


def _rows_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


class _Counter:
    """Accumulates n_j from candidate entries (query, gallery item, approximate similarity).

    `pos_sim` holds the exact similarity of each positive that matters and +inf for the
    rest (and for padding): +inf is never beaten and never uncertain.
    """

    def __init__(
        self,
        q64,
        g64,
        ql,
        gl,
        pos_idx,
        pos_exact,
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
        self.eps32 = (2 * 2.0**-24 + 2.0**-48 + gamma * (1 + 2.0**-24) ** 2) * 1.01 + 1e-12
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
        self.lo = torch.full((n_pad,), torch.inf, device=q64.device)  # candidate threshold
        self.candidates = self.rescored = 0

    def learn(self, q: torch.Tensor, lower: torch.Tensor) -> None:
        """Merge proven lower bounds of (distinct, not yet seen) negatives; tighten lo.

        L = (R+1)-th best of {exact positives} and these bounds is a lower bound on the
        (R+1)-th best similarity. A positive below L ranks beyond R + 1: it stops mattering
        (it never matters again, as L only grows). The best positive keeps mattering
        until its rank is known to exceed `max_rank` (see `_retire_deep`).
        """
        if len(q) == 0:
            return
        width = self.best_neg.shape[1]
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
        self.best_neg[rows] = torch.cat([self.best_neg[rows], fresh], 1).topk(width, dim=1).values
        known = torch.cat([self.pos_exact[rows], self.best_neg[rows]], 1).sort(
            dim=1, descending=True
        )
        bound = known.values.gather(1, self.num_pos[rows][:, None])
        matters = self.matters[rows] & (self.pos_exact[rows] >= bound)
        matters[:, 0] = self.matters[rows, 0]  # only `_retire_deep` drops the best one
        self.matters[rows] = matters
        self.pos_sim[rows] = torch.where(matters, self.pos_exact[rows], torch.inf)
        self.eps[rows] = self.bounds.at(torch.where(matters, self.pos_exact[rows], 0), rows)
        lo = torch.where(matters, self.pos_sim[rows] - self.eps[rows], torch.inf).amin(1)
        self.lo[rows] = lo.float()

    def add(self, q: torch.Tensor, g: torch.Tensor, approx: torch.Tensor, learn: bool) -> None:
        negative = self.gl[g] != self.ql[q]  # drops the query itself and its positives
        q, g, approx = q[negative], g[negative], approx[negative].double()
        self.candidates += len(q)
        for s in range(0, len(q), ENTRY_CHUNK):
            self._add(q[s : s + ENTRY_CHUNK], g[s : s + ENTRY_CHUNK], approx[s : s + ENTRY_CHUNK])
        if learn:  # only after counting: `learn` may retire positives these entries beat
            self.learn(q, approx - self.bounds.widest(q))

    def _add(self, q, g, approx) -> None:
        p_sim, eps = self.pos_sim[q], self.eps[q]
        above = approx[:, None] > p_sim + eps
        unsure = ~above & (approx[:, None] >= p_sim - eps)
        rows = unsure.any(1).nonzero().squeeze(1)
        if len(rows):  # float32 first (half the memory traffic), float64 within its bound
            self.rescored += len(rows)
            qr, gr = q[rows], g[rows]
            ps, unsure = p_sim[rows], unsure[rows]
            s32 = _rows_dot(self.q32[qr], self.g32[gr]).double()[:, None]
            beats = s32 > ps + self.eps32
            close = unsure & ~beats & (s32 >= ps - self.eps32)
            tight = close.any(1).nonzero().squeeze(1)
            if len(tight):
                s64 = _rows_dot(self.q64[qr[tight]], self.g64[gr[tight]])[:, None]
                pt, pi = ps[tight], self.pos_idx[qr[tight]]
                exact = (s64 > pt) | ((s64 == pt) & (gr[tight, None] < pi))
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


def _sortable_bits(block: torch.Tensor) -> torch.Tensor:
    """A view whose integer order equals the value order for values >= 0.

    bfloat16 bit patterns read as int16 order non-negative values correctly and put all
    negative values below them; max-pooling the bits is a cheap exact filter for
    thresholds > 0 (float32 blocks are compared as they are).
    """
    return block.view(torch.int16) if block.dtype == torch.bfloat16 else block


def _threshold_bits(lo: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`lo` in the units of `_sortable_bits`, rounded down; lo <= 0 passes every segment."""
    if dtype != torch.bfloat16:
        return lo
    top = (lo.float().clamp(max=1e30).view(torch.int32) >> 16).to(
        torch.int16
    )  # truncates: rounds down
    return torch.where(lo > 0, top, torch.iinfo(torch.int16).min).masked_fill(lo.isinf(), 32767)


def _candidates_rows(block: torch.Tensor, lo: torch.Tensor):
    """(row, col, value) of the entries with value >= lo[row]; block columns % SEGMENT == 0."""
    r, c = block.shape
    seg_max = _sortable_bits(block).view(r, c // SEGMENT, SEGMENT).amax(2)
    rr, ss = (seg_max >= _threshold_bits(lo, block.dtype)[:, None]).nonzero(as_tuple=True)
    cols = ss[:, None] * SEGMENT + torch.arange(SEGMENT, device=block.device)
    vals = block[rr[:, None], cols].float()
    keep = vals >= lo[rr][:, None]
    return rr[:, None].expand_as(cols)[keep], cols[keep], vals[keep]


def _candidates_cols(block: torch.Tensor, lo: torch.Tensor):
    """(col, row, value) of the entries with value >= lo[col]; block rows % SEGMENT == 0."""
    r, c = block.shape
    seg_max = _sortable_bits(block).view(r // SEGMENT, SEGMENT, c).amax(1)
    ss, cc = (seg_max >= _threshold_bits(lo, block.dtype)[None, :]).nonzero(as_tuple=True)
    rows = ss[:, None] * SEGMENT + torch.arange(SEGMENT, device=block.device)
    vals = block[rows, cc[:, None]].float()
    keep = vals >= lo[cc][:, None]
    return cc[:, None].expand_as(rows)[keep], rows[keep], vals[keep]


def _padded(x: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = (-len(x)) % multiple
    return torch.cat([x, x.new_zeros(extra, x.shape[1])]) if extra else x


def _best_negatives(sim, first_row, first_col, ctx):
    """(query, lower bound) for each row's best negatives in this block (R_max + 1 of them)."""
    rows = torch.arange(first_row, first_row + len(sim), device=sim.device)
    # any items give a valid bound; the bit order picks the best non-negative ones
    cols = _sortable_bits(sim).topk(min(ctx.pos_sim.shape[1] + 2, sim.shape[1]), dim=1).indices
    g = cols + first_col
    negative = (g < ctx.n_g) & (ctx.gl[g.clamp(max=ctx.n_g - 1)] != ctx.ql[rows][:, None])
    if ctx.same:
        negative &= g != rows[:, None]
    lower = sim.gather(1, cols).double() - ctx.bounds.widest(rows)[:, None]
    q = rows[:, None].expand_as(cols)
    return q[negative], lower[negative]


@dataclass
class _Context:
    q64: torch.Tensor
    g64: torch.Tensor
    ql: torch.Tensor
    gl: torch.Tensor
    n_g: int
    same: bool
    pos_sim: torch.Tensor  # (Q, R_max) exact, sorted best first, -inf padding
    num_pos: torch.Tensor
    bounds: _Bounds


def rank_positives(*args, **kwargs) -> PositiveRanks:
    """Exact n_j (negatives ranked above each positive) for every query.

    Arguments as `_rank_positives`. Small bookkeeping ops run single-threaded: with two
    threads on a busy machine their OpenMP regions spin-wait and cost more than the work
    (measured: 7x slower overall on 2 shared cores); the GEMMs get every thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _rank_positives(*args, threads=threads, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _rank_positives(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor | None = None,
    gallery_labels: torch.Tensor | None = None,
    candidate: torch.dtype | None = None,
    block: int = BLOCK,
    max_rank: int | None = None,
    threads: int = 1,
) -> PositiveRanks:
    """Exact n_j (negatives ranked above each positive) for every query.

    Without a gallery the queries are their own gallery and each query is left out of its
    own neighbours. Embeddings need not be normalised; labels are integers. `candidate`
    overrides the candidate GEMM dtype; `block` the block size (tests use small ones).
    `max_rank` (e.g. the largest Recall@K): a query whose best positive ranks deeper is
    reported as "beyond" for every positive, which bounds the work on poor embeddings.
    """
    same = gallery is None
    device = queries.device
    q64 = torch.nn.functional.normalize(queries.double(), dim=1)
    g64 = q64 if same else torch.nn.functional.normalize(gallery.double(), dim=1)
    ql = query_labels.long().to(device)
    gl = ql if same else gallery_labels.long().to(device)
    n_q, n_g = len(q64), len(g64)

    pos_idx, pos_sim, num_pos = _positives(q64, g64, ql, gl, same)
    if pos_idx.shape[1] == 0:  # only lone queries: nothing to rank
        return PositiveRanks(num_pos, pos_idx.clone())
    dtype = candidate or candidate_dtype(device)
    block = max(SEGMENT, block // SEGMENT * SEGMENT)
    qc = _padded(q64, SEGMENT).to(dtype)
    gc = qc if same else _padded(g64, SEGMENT).to(dtype)
    bounds = _Bounds(q64, g64, qc[:n_q], qc[:n_q] if same else gc[:n_g], dtype, device)
    ctx = _Context(q64, g64, ql, gl, n_g, same, pos_sim, num_pos, bounds)

    cap = max(max_rank or n_g, pos_idx.shape[1] + 1)  # beyond R + 1 too
    counter = _Counter(q64, g64, ql, gl, pos_idx, pos_sim, num_pos, bounds, len(qc), cap)
    lo = counter.lo

    def gemm(i, j):  # the only heavy kernel: it gets every thread, the bookkeeping gets one
        torch.set_num_threads(threads)
        try:
            return qc[i : i + block] @ gc[j : j + block].T
        finally:
            torch.set_num_threads(1)

    def scan(sim, i, j, both_sides, learn=True):
        r, c, v = _candidates_rows(sim, lo[i : i + len(sim)])
        ok = c + j < n_g
        counter.add(r[ok] + i, c[ok] + j, v[ok], learn)
        if both_sides:  # the transposed block: queries j..., gallery items i...
            c, r, v = _candidates_cols(sim, lo[j : j + sim.shape[1]])
            ok = r + i < n_g
            counter.add(c[ok] + j, r[ok] + i, v[ok], learn)

    # Diagonal blocks (or the first gallery block) first: their best negatives give each
    # query its first bound L; later blocks' candidates tighten it (each item once).
    for i in range(0, n_q, block):
        j = i if same else 0
        sim = gemm(i, j)
        rows = min(block, n_q - i)
        counter.learn(*_best_negatives(sim[:rows], i, j, ctx))
        scan(sim, i, j, False, learn=False)
    for i in range(0, n_q, block):
        for j in range(i + block if same else block, len(gc), block):
            scan(gemm(i, j), i, j, same)

    counts = counter.counts.masked_fill(~counter.matters, n_g)
    return PositiveRanks(num_pos, counts, counter.candidates, counter.rescored)
