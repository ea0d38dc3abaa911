"""Whether an evaluation's embeddings mean anything: non-finite values, collapse.

Non-finite embeddings (`non_finite_embeddings`) raise `Diverged` (vpt_dml/errors.py): the
weights hold NaN/inf, and the run stops as a diverged training step stops it
(runs/callbacks/divergence.py).

Embedding health (`embedding_health`): a collapsed model (every image on one point, e.g.
after `optim.lr=1e6`) still gets retrieval numbers (ties ranked by index), and they look
like chance or better. Each evaluation therefore also counts, on the L2-normalised
embeddings the cosine ranking sees:
- `distinct`: distinct rows, unit rows compared at DISTINCT_DECIMALS decimals (rows equal
  up to float rounding, e.g. one direction at several lengths, are ties for the ranking);
- `effective_rank`: exp of the entropy of the normalised singular values of the centred
  embeddings (Roy & Vetterli 2007): ~D for a spread over D directions, 1 for one
  direction, 0 when the rows' RMS distance to their mean is below SPREAD_TOL (one point,
  up to float rounding).
`collapsed` says when the metrics mean nothing (runs/record.py turns it into a warning).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vpt_dml.errors import Diverged

# precisions with a GradScaler, which skips overflowing steps by itself
SCALED = {"16-mixed", "16"}


def precision_of(trainer) -> str:
    return str(getattr(trainer, "precision", "32-true"))


def _cause(precision: str) -> str:
    if precision in SCALED or precision.startswith("16"):
        return "fp16 overflow or diverging weights"
    return f"the weights diverged in {precision} arithmetic"


def _non_finite(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def non_finite_embeddings(emb: torch.Tensor, trainer, stage: str) -> None:
    """Raise Diverged when an evaluation's embeddings hold NaN or inf."""
    if bool(torch.isfinite(emb).all()):
        return
    precision = precision_of(trainer)
    fitting = getattr(trainer.state, "fn", None) == "fit"
    if fitting:
        where = f"the evaluation after epoch {trainer.current_epoch}"
    elif stage == "test":
        where = "the test evaluation"
    else:
        where = "the evaluation before training"
    raise Diverged(
        f"{where} gave NaN/inf embeddings under trainer.precision={precision}: "
        f"{_cause(precision)}; lower optim.lr, or check the weights given",
        {"stage": stage, "epoch": trainer.current_epoch, "precision": precision},
    )


# far above float32 rounding of a unit vector (~1e-7), far below a meaningful difference
DISTINCT_DECIMALS = 5
# RMS distance of unit rows to their mean below this: one point (float32 rounding is ~1e-7)
SPREAD_TOL = 1e-4
# collapsed: fewer distinct rows than this fraction, or spread along less than ~1.5 directions
MIN_DISTINCT_FRACTION = 0.5
MIN_EFFECTIVE_RANK = 1.5


def embedding_health(emb: torch.Tensor) -> dict:
    """{"rows", "dim", "distinct", "effective_rank"} of one evaluation's embeddings."""
    x = F.normalize(emb.float(), dim=1)
    rows, dim = x.shape
    scale = 10.0**DISTINCT_DECIMALS
    distinct = len(torch.unique(torch.round(x * scale), dim=0)) if rows else 0
    centred = x - x.mean(0, keepdim=True)
    # singular values from the D x D Gram matrix: cheap for N >> D (SOP: 60k x 512)
    gram = (centred.T @ centred).double()
    sv = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    spread = math.sqrt(float(gram.diagonal().sum()) / max(rows, 1))
    if spread < SPREAD_TOL or float(sv.sum()) == 0.0:
        rank = 0.0
    else:
        p = sv / sv.sum()
        p = p[p > 0]
        rank = float(torch.exp(-(p * p.log()).sum()))
    return {"rows": rows, "dim": dim, "distinct": distinct, "effective_rank": round(rank, 3)}


def collapsed(health: dict) -> str | None:
    """Why the embeddings cannot be ranked meaningfully, or None when they can."""
    rows, distinct, rank = health["rows"], health["distinct"], health["effective_rank"]
    if rows and distinct < MIN_DISTINCT_FRACTION * rows:
        return f"{distinct} distinct embedding(s) among {rows} images"
    if rows > 1 and rank < MIN_EFFECTIVE_RANK:
        return f"effective rank {rank:.2f} of {health['dim']} dimensions"
    return None
