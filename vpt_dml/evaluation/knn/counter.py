"""The counter of n_j: candidate entries (`_Counter.add`) or whole block sides counted
densely (`_Counter.add_dense`), with the bound L that retires deep positives."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vpt_dml.evaluation.knn.exact import (
    _Bounds,
    _distinct_ids,
    _float32_at_most,
    _pair_dots,
    _rows_dot,
    float64_tolerance,
)

ENTRY_CHUNK = 1 << 19  # candidate entries compared against the positives at a time
DENSE_CHUNK = 1 << 20  # entries of a dense chunk (rows x gallery columns)


@dataclass
class _Dense:
    """A block side to count densely: queries q0..q1 against gallery items g0..g1."""

    q0: int
    q1: int
    g0: int
    g1: int


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
