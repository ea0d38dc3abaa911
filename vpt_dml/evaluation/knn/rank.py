"""The driver: `rank_positives` schedules the blocks over threads and feeds the counter."""

from __future__ import annotations

import collections
import contextlib
import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from vpt_dml.evaluation.knn.blocks import SEGMENT, _Block, _in_dataset, _padded
from vpt_dml.evaluation.knn.counter import _Counter, _Dense
from vpt_dml.evaluation.knn.dtype_choice import candidate_dtype
from vpt_dml.evaluation.knn.exact import _Bounds, unit_rows
from vpt_dml.evaluation.knn.positives import _positives

BLOCK = 4096  # rows and columns per similarity block (rounded to a multiple of TILE)
TILE = 256  # columns per GEMM call on CPU: a BLOCK x TILE output stays in cache
MAX_WORKERS = 8  # default cap on block threads (each holds a BLOCK x TILE buffer)
# a block side whose candidate filter passes more than this share of its column runs is
# counted densely: past it, per-candidate bookkeeping costs more than comparing every entry
DENSE_SHARE = 1 / 8


@dataclass
class PositiveRanks:
    """Per query: R and n_j (negatives ranked above the j-th best positive)."""

    num_positives: torch.Tensor  # (Q,)
    negatives_above: torch.Tensor  # (Q, R_max) int64; "beyond R + 1" positives hold len(gallery)
    candidates: int = 0  # candidate entries examined (dense block sides: every entry)
    rescored: int = 0  # similarities re-scored beyond the block GEMM (float32 / exact_dot)
    dense_entries: int = 0  # entries counted by the dense path (`_Counter.add_dense`)


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
