"""Exact float64 similarity (`exact_dot`, the one that defines the ranking and its ties),
the error bounds of the faster kernels against it (`float64_tolerance`, `_Bounds` for
the candidate GEMM), and distinct-vector ids (equal embeddings share one exact value)."""

from __future__ import annotations

import math

import torch

ROW_CHUNK = 4096  # rows per float64 helper computation
PAIR_CHUNK = (
    256  # vector pairs gathered at a time for re-scoring (stays in L2: 3x faster than 2048)
)


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


def _rows_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(a, b)


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
