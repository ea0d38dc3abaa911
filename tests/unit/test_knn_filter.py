"""The block candidate filter (`knn._Block.stream`) returns exactly the entries at or
above each query's threshold, for both sides of a block, whatever the thresholds."""

from __future__ import annotations

import pytest
import torch

from vpt_dml.evaluation import knn


def wanted(sim: torch.Tensor, lo_rows: torch.Tensor, lo_cols: torch.Tensor):
    """Reference sets from the float32 values of the block, by plain comparison."""
    v = sim.float()
    r, c = (v >= lo_rows[:, None]).nonzero(as_tuple=True)
    rows = {(int(a), int(b), float(v[a, b])) for a, b in zip(r, c)}
    r, c = (v >= lo_cols[None, :]).nonzero(as_tuple=True)
    cols = {(int(b), int(a), float(v[a, b])) for a, b in zip(r, c)}
    return rows, cols


def as_set(found):
    a, b, v = found
    return {(int(x), int(y), float(z)) for x, y, z in zip(a, b, v)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seed", range(4))
def test_block_candidates_are_exactly_the_entries_above_threshold(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    rows, cols, tile = 128, 256, 64  # 4 tiles, rows a multiple of both run shapes
    q = torch.nn.functional.normalize(torch.randn(rows, 16, generator=gen), dim=1).to(dtype)
    g = torch.nn.functional.normalize(torch.randn(cols, 16, generator=gen), dim=1).to(dtype)
    sim = (q.float() @ g.float().T).to(dtype)  # only for picking thresholds
    v = sim.float()

    def thresholds(values, n):
        # a mix: an entry's own value (ties at the threshold), negative, zero, +inf,
        # just above and below an entry, and values no entry reaches
        pick = values[torch.arange(n), torch.randint(values.shape[1], (n,), generator=gen)]
        kind = torch.randint(6, (n,), generator=gen)
        lo = torch.where(kind == 0, pick, -0.3 + 0.6 * torch.rand(n, generator=gen))
        lo = torch.where(kind == 1, torch.inf, lo)
        lo = torch.where(kind == 2, torch.nextafter(pick, torch.tensor(2.0)), lo)
        lo = torch.where(kind == 3, torch.nextafter(pick, torch.tensor(-2.0)), lo)
        return torch.where(kind == 4, 0.0, lo)

    lo_rows, lo_cols = thresholds(v, rows), thresholds(v.T, cols)
    blk = knn._Block(rows, cols, tile, dtype, torch.device("cpu"), knn.SEGMENT)
    found = blk.stream(q, g, lambda: lo_rows, lambda: lo_cols)
    want_rows, want_cols = wanted(blk.sim.permute(1, 0, 2).reshape(rows, cols), lo_rows, lo_cols)
    assert len(want_rows) > 0 and len(want_cols) > 0
    assert as_set(found[0]) == want_rows
    assert as_set(found[1]) == want_cols
    # the block kept is the GEMM's own output, tile by tile
    for t in range(cols // tile):
        assert torch.equal(blk.sim[t], q @ g[t * tile : (t + 1) * tile].T)
