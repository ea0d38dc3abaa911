"""Exact cosine ranking of every query's positives, fast on CPU and GPU.

Every retrieval metric we report (Recall@K, MAP@R, R-precision) depends only on where
the positives (same-class gallery items) land in the query's neighbour list. With the
positives sorted best first, n_j = number of negatives ranked above the j-th positive,
whose rank is then n_j + j. So instead of top-K lists (K = 1000 on SOP) we count, per
query and positive, the negatives that beat it:
- n_1 is always exact (Recall@K needs the first positive's rank, for any K);
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
anything within eps is re-scored in float64. A negative matters only if it could beat a
positive that matters, so candidates are the entries with s_approx >= lo (per query); a
max-pool over 64-wide column segments finds them without another full pass. When the
query set is its own gallery the matrix is symmetric: only blocks on and above the
diagonal are computed and each off-diagonal block serves its rows and its columns. The
diagonal blocks go first; their best entries give each query its bound L.
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
    rescored: int = 0  # of those, re-scored in float64


def candidate_dtype(device: torch.device) -> torch.dtype:
    # bfloat16 GEMMs run at about twice float32 speed on AVX512-BF16 CPUs; GPUs are fast
    # enough in float32, which keeps the candidate window narrow.
    return torch.bfloat16 if device.type == "cpu" else torch.float32


def _unit_roundoffs(dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """(u_in, u_out): GEMM input and output rounding; float32 on CUDA may run as TF32."""
    if dtype == torch.bfloat16:
        return 2.0**-8, 2.0**-8
    if dtype == torch.float32:
        return (2.0**-10 if device.type == "cuda" else 2.0**-24), 2.0**-24
    raise ValueError(f"no error bound for candidate dtype {dtype}")


class _Bounds:
    """Proven |s_approx - s_exact| for the candidate GEMM of unit vectors q, g.

    With e = x^ - x the rounding error of each input (computed, not estimated),
      |q^.g^ - q.g| <= |e_q . g^| + |q . e_g| <= |e_q| (1 + max|e_g|) + max|e_g|   (Cauchy-Schwarz)
    float32 accumulation over D terms adds gamma_D (1 + |e_q|)(1 + max|e_g|) with
    gamma_D = D 2^-24 / (1 - D 2^-24), and rounding the output to the GEMM's dtype adds
    u_out |v| with |v| <= |s| + eps_in. CUDA's TF32 rounds inputs inside the GEMM: there
    the input term is the worst case 2 u_in + u_in^2 instead. A 1% safety factor and 1e-9
    absolute cover the float64 normalisation and re-score.
    """

    def __init__(self, q64, g64, q_c, g_c, dtype, device) -> None:
        u_in, self.u_out = _unit_roundoffs(dtype, device)
        dim = q64.shape[1]
        gamma = dim * 2.0**-24 / (1 - dim * 2.0**-24)
        if device.type == "cuda" and dtype == torch.float32:
            self.eps_in = torch.full((len(q64),), 2 * u_in + u_in**2 + gamma * (1 + u_in) ** 2,
                                     dtype=torch.float64, device=device)
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
    return torch.cat([
        (x_c[s : s + ROW_CHUNK].double() - x64[s : s + ROW_CHUNK]).norm(dim=1)
        for s in range(0, len(x64), ROW_CHUNK)
    ])


def _positive_table(query_labels: torch.Tensor, gallery_labels: torch.Tensor, same: bool):
    """(Q, R_max) gallery indices of each query's positives (ascending, -1 padded), and R."""
    device = gallery_labels.device
    order = torch.argsort(gallery_labels, stable=True)  # by label, then by index
    classes, counts = torch.unique_consecutive(gallery_labels[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.searchsorted(classes, query_labels).clamp(max=len(classes) - 1)
    count = torch.where(classes[pos] == query_labels, counts[pos], 0)
    cols = torch.arange(int(count.max()), device=device)
    take = (starts[pos][:, None] + cols).clamp(max=len(order) - 1)
    idx = torch.where(cols < count[:, None], order[take], -1)
    if same:  # the query is not its own positive
        idx = torch.where(idx == torch.arange(len(idx), device=device)[:, None], -1, idx)
    # move the -1 padding to the end, keeping ascending gallery order
    idx = torch.gather(idx, 1, torch.argsort(idx < 0, dim=1, stable=True))
    num = (idx >= 0).sum(1)
    return idx[:, : int(num.max())], num


def _rows_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


class _Counter:
    """Accumulates n_j from candidate entries (query, gallery item, approximate similarity).

    `pos_sim` holds the exact similarity of each positive that matters and +inf for the
    rest (and for padding): +inf is never beaten and never uncertain.
    """

    def __init__(self, q64, g64, ql, gl, pos_idx, bounds: _Bounds) -> None:
        self.q64, self.g64, self.ql, self.gl = q64, g64, ql, gl
        self.pos_idx, self.bounds = pos_idx, bounds
        self.pos_sim = torch.full(pos_idx.shape, torch.inf, dtype=torch.float64, device=q64.device)
        self.eps = torch.zeros_like(self.pos_sim)
        self.matters = torch.zeros_like(pos_idx, dtype=torch.bool)
        self.counts = torch.zeros_like(pos_idx)
        self.candidates = self.rescored = 0

    def set_rows(self, rows: slice, pos_sim: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
        """Decide which positives of `rows` matter; returns their candidate threshold lo.

        The best positive always matters (Recall@K); the others only if they can still
        rank within R + 1, i.e. are not below the lower bound on the (R+1)-th best.
        """
        matters = pos_sim >= lower[:, None]
        matters[:, :1] = True
        matters &= self.pos_idx[rows] >= 0
        self.matters[rows] = matters
        self.pos_sim[rows] = torch.where(matters, pos_sim, torch.inf)
        self.eps[rows] = self.bounds.at(torch.where(matters, pos_sim, 0), rows)
        return torch.where(matters, pos_sim - self.eps[rows], torch.inf).amin(1)

    def add(self, q: torch.Tensor, g: torch.Tensor, approx: torch.Tensor) -> None:
        negative = self.gl[g] != self.ql[q]  # drops the query itself and its positives
        q, g, approx = q[negative], g[negative], approx[negative].double()
        self.candidates += len(q)
        for s in range(0, len(q), ENTRY_CHUNK):
            self._add(q[s : s + ENTRY_CHUNK], g[s : s + ENTRY_CHUNK], approx[s : s + ENTRY_CHUNK])

    def _add(self, q, g, approx) -> None:
        p_sim, eps = self.pos_sim[q], self.eps[q]
        above = approx[:, None] > p_sim + eps
        unsure = ~above & (approx[:, None] >= p_sim - eps)
        rows = unsure.any(1).nonzero().squeeze(1)
        if len(rows):
            self.rescored += len(rows)
            exact = _rows_dot(self.q64[q[rows]], self.g64[g[rows]])[:, None]
            ps, pi = p_sim[rows], self.pos_idx[q[rows]]
            beats = (exact > ps) | ((exact == ps) & (g[rows, None] < pi))
            above[rows] = torch.where(unsure[rows], beats, above[rows])
        self.counts.index_add_(0, q, above.long())


def _candidates_rows(block: torch.Tensor, lo: torch.Tensor):
    """(row, col, value) of the entries with value >= lo[row]; block columns % SEGMENT == 0."""
    r, c = block.shape
    seg_max = block.view(r, c // SEGMENT, SEGMENT).amax(2)
    rr, ss = (seg_max >= lo[:, None]).nonzero(as_tuple=True)
    cols = ss[:, None] * SEGMENT + torch.arange(SEGMENT, device=block.device)
    vals = block[rr[:, None], cols]
    keep = vals >= lo[rr][:, None]
    return rr[:, None].expand_as(cols)[keep], cols[keep], vals[keep]


def _candidates_cols(block: torch.Tensor, lo: torch.Tensor):
    """(col, row, value) of the entries with value >= lo[col]; block rows % SEGMENT == 0."""
    r, c = block.shape
    seg_max = block.view(r // SEGMENT, SEGMENT, c).amax(1)
    ss, cc = (seg_max >= lo[None, :]).nonzero(as_tuple=True)
    rows = ss[:, None] * SEGMENT + torch.arange(SEGMENT, device=block.device)
    vals = block[rows, cc[:, None]]
    keep = vals >= lo[cc][:, None]
    return cc[:, None].expand_as(rows)[keep], rows[keep], vals[keep]


def _padded(x: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = (-len(x)) % multiple
    return torch.cat([x, x.new_zeros(extra, x.shape[1])]) if extra else x


def _lower_bound_r1(sim, first_row, first_col, ctx) -> torch.Tensor:
    """Proven lower bound on the (R+1)-th best exact similarity of rows first_row...

    The (R+1)-th best of any R+1 gallery items is a lower bound: take the R exact
    positives and the block's best negatives, each lowered by its error bound.
    """
    rows = torch.arange(first_row, first_row + len(sim), device=sim.device)
    vals, cols = sim.topk(min(ctx.pos_sim.shape[1] + 2, sim.shape[1]), dim=1)
    g = cols + first_col
    negative = (g < ctx.n_g) & (ctx.gl[g.clamp(max=ctx.n_g - 1)] != ctx.ql[rows][:, None])
    if ctx.same:
        negative &= g != rows[:, None]
    lower = vals.double() - ctx.bounds.widest(rows)[:, None]
    known = torch.cat([ctx.pos_sim[rows], torch.where(negative, lower, -torch.inf)], dim=1)
    best = known.sort(dim=1, descending=True).values
    return best.gather(1, ctx.num_pos[rows][:, None]).squeeze(1)


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


def rank_positives(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor | None = None,
    gallery_labels: torch.Tensor | None = None,
    candidate: torch.dtype | None = None,
    block: int = BLOCK,
) -> PositiveRanks:
    """Exact n_j (negatives ranked above each positive) for every query.

    Without a gallery the queries are their own gallery and each query is left out of its
    own neighbours. Embeddings need not be normalised; labels are integers.
    """
    same = gallery is None
    device = queries.device
    q64 = torch.nn.functional.normalize(queries.double(), dim=1)
    g64 = q64 if same else torch.nn.functional.normalize(gallery.double(), dim=1)
    ql = query_labels.long().to(device)
    gl = ql if same else gallery_labels.long().to(device)
    n_q, n_g = len(q64), len(g64)

    pos_idx, num_pos = _positive_table(ql, gl, same)
    pos_sim = torch.cat([  # chunked: the gathered (rows, R_max, D) block stays small
        _rows_dot(q64[s : s + ROW_CHUNK, None, :], g64[pos_idx[s : s + ROW_CHUNK].clamp(min=0)])
        for s in range(0, n_q, ROW_CHUNK)
    ])
    pos_sim = torch.where(pos_idx >= 0, pos_sim, -torch.inf)
    # best first; the table is in ascending index order, so a stable sort breaks ties by index
    order = torch.argsort(pos_sim, dim=1, descending=True, stable=True)
    pos_sim, pos_idx = pos_sim.gather(1, order), pos_idx.gather(1, order)

    if pos_idx.shape[1] == 0:  # only lone queries: nothing to rank
        return PositiveRanks(num_pos, pos_idx.clone())
    dtype = candidate or candidate_dtype(device)
    block = max(SEGMENT, block // SEGMENT * SEGMENT)
    qc = _padded(q64, SEGMENT).to(dtype)
    gc = qc if same else _padded(g64, SEGMENT).to(dtype)
    bounds = _Bounds(q64, g64, qc[:n_q], qc[:n_q] if same else gc[:n_g], dtype, device)
    ctx = _Context(q64, g64, ql, gl, n_g, same, pos_sim, num_pos, bounds)

    counter = _Counter(q64, g64, ql, gl, pos_idx, bounds)
    lo = torch.full((len(qc),), torch.inf, device=device)

    def scan(sim, i, j, both_sides):
        r, c, v = _candidates_rows(sim, lo[i : i + len(sim)])
        ok = c + j < n_g
        counter.add(r[ok] + i, c[ok] + j, v[ok])
        if both_sides:  # the transposed block: queries j..., gallery items i...
            c, r, v = _candidates_cols(sim, lo[j : j + sim.shape[1]])
            ok = r + i < n_g
            counter.add(c[ok] + j, r[ok] + i, v[ok])

    # Diagonal blocks (or the first gallery block) first: they set each query's bound L.
    for i in range(0, n_q, block):
        j = i if same else 0
        sim = (qc[i : i + block] @ gc[j : j + block].T).float()
        rows = slice(i, min(i + block, n_q))
        lower = _lower_bound_r1(sim[: rows.stop - i], i, j, ctx)
        lo[rows] = counter.set_rows(rows, pos_sim[rows], lower).float()
        scan(sim, i, j, False)
    for i in range(0, n_q, block):
        for j in range(i + block if same else block, len(gc), block):
            scan((qc[i : i + block] @ gc[j : j + block].T).float(), i, j, same)

    counts = counter.counts.masked_fill(~counter.matters, n_g)
    return PositiveRanks(num_pos, counts, counter.candidates, counter.rescored)
