"""Blocks of the candidate GEMM: computed a column tile at a time, max-pooled over runs
while in cache, and filtered to the entries at or above each query's threshold."""

from __future__ import annotations

import torch

from vpt_dml.evaluation.knn.counter import _Dense

SEGMENT = 64  # column segment width of the max-pool candidate filter
COLUMN_RUN = 16  # its row-run height for the transposed side (strided reads: kept short)


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
