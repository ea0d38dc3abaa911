"""Each query's positives in exact order (the tie rule), from one Gram matrix per class."""

from __future__ import annotations

import torch

from vpt_dml.evaluation.knn.exact import _pair_dots, float64_tolerance


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
