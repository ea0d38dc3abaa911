"""Tolerances from the dtype, for results computed by other kernels or batch compositions.

A float32 GEMM's result changes with the batch it is in and with the CPU's kernels (AMX,
avx512_bf16, avx2): the same image's embedding differs by ~1e-6 relative between two
batches on an AMD EPYC (6.8e-6 seen). numpy's default rtol=1e-7 (and torch's 1.3e-6 for
float32) are float64-sized; they fail on one CPU and pass on another. Where a test claims
bit equality (a resume, a determinism check, rows never touched) it says so with
rtol=0, atol=0 and compares two results made the same way on the same machine.
`make lint` runs tests/check_tolerances.py, which keeps every comparison explicit.
"""

from __future__ import annotations

import numpy as np

ULPS_REL = 128  # relative: 1.5e-5 for float32 (accumulated rounding of a dot product)
ULPS_ABS = 16  # absolute, per unit of the values' scale: entries near zero of a unit vector


def close(dtype, scale: float = 1.0) -> dict[str, float]:
    """rtol/atol for `dtype` (a numpy or torch dtype, or its name): `scale` is the size of
    the compared values (1 for unit-norm embeddings)."""
    if isinstance(dtype, str) or "torch" in type(dtype).__module__:
        name = str(dtype).rsplit(".", 1)[-1]  # torch.float32 -> float32
        eps = float(np.finfo(np.dtype(name)).eps)
    else:
        eps = float(np.finfo(dtype).eps)
    return {"rtol": ULPS_REL * eps, "atol": ULPS_ABS * eps * scale}


def approx_close(dtype, scale: float = 1.0) -> dict[str, float]:
    """close(dtype, scale) in pytest.approx's names (rel, abs)."""
    tol = close(dtype, scale)
    return {"rel": tol["rtol"], "abs": tol["atol"]}


EXACT = {"rtol": 0.0, "atol": 0.0}  # bit equality: the same computation, the same machine
