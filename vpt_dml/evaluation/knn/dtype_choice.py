"""The candidate GEMM dtype: bfloat16 only where the CPU multiplies bfloat16 natively
(CPU flags from /proc/cpuinfo and torch's probe; a one-time benchmark where they cannot
tell), float32 on GPU. Decided once per process, reported in run provenance."""

from __future__ import annotations

import math
import platform
import time
from pathlib import Path

import torch

# x86 flags of bfloat16 matrix instructions (AVX512-BF16 dot products, AMX tiles); a CPU
# with AVX-512 but neither runs oneDNN's bfloat16 GEMM emulated, about 2x slower than float32
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "amx_tile"})
_SHOWN_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "amx_tile", "amx_bf16", "amx_int8", "bf16", "sve", "i8mm")  # fmt: skip
BENCH_MARGIN = 0.7  # bfloat16 must beat float32 clearly: it also widens the re-score window
_CPU_CHOICE: dict | None = None  # decided once per process


def decide_cpu_dtype(
    flags: set[str] | None, onednn_bf16: bool, x86: bool
) -> tuple[torch.dtype | None, str]:
    """(dtype, reason) from what the CPU reports; dtype None: undecided, benchmark both.

    `flags`: the CPU's feature flags (None when unknown), `onednn_bf16`: whether torch's
    oneDNN has bfloat16 kernels for this CPU at all (true on any AVX-512 CPU, emulated or
    not, so it is necessary but not sufficient).
    """
    if not onednn_bf16:
        return torch.float32, "torch's oneDNN has no bfloat16 GEMM for this CPU"
    if flags is None or not x86:
        return None, "bfloat16 speed unknown from the CPU flags: measured"
    native = sorted(flags & NATIVE_BF16_FLAGS)
    if native:
        return torch.bfloat16, f"native bfloat16 matrix instructions ({', '.join(native)})"
    return torch.float32, (
        "no native bfloat16 matrix instructions (no avx512_bf16 or amx_bf16): "
        "bfloat16 GEMM would be emulated and slower than float32"
    )


def decide_by_benchmark(times: dict[str, float]) -> tuple[torch.dtype, str]:
    """bfloat16 when its GEMM took under BENCH_MARGIN of float32's time."""
    bf16, fp32 = times["bfloat16"], times["float32"]
    choice = torch.bfloat16 if bf16 < BENCH_MARGIN * fp32 else torch.float32
    return choice, (
        f"measured GEMM 1024x1024x512: bfloat16 {bf16 * 1e3:.2f} ms, float32 {fp32 * 1e3:.2f} ms "
        f"(bfloat16 chosen below {BENCH_MARGIN} x float32)"
    )


def _proc_cpu_flags(path: str = "/proc/cpuinfo") -> set[str] | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, ARM
            return set(value.split())
    return None


def _torch_cpu_flags() -> set[str] | None:
    """The bfloat16 flags torch's own CPU probe (cpuinfo) reports; None if it has none."""
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported"}
    found, asked = set(), False
    for flag, name in probes.items():
        probe = getattr(torch.cpu, name, None)
        if probe is None:
            continue
        try:
            asked = True
            if probe():
                found.add(flag)
        except RuntimeError:
            continue
    return found if asked else None


def _onednn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _benchmark_gemm(size: int = 1024, dim: int = 512, reps: int = 3) -> dict[str, float]:
    """Best-of-`reps` seconds of one size x size x dim GEMM per dtype, interleaved."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, dim, generator=gen), torch.randn(size, dim, generator=gen)
    pairs = {"float32": (a, b), "bfloat16": (a.bfloat16(), b.bfloat16())}
    best = dict.fromkeys(pairs, math.inf)
    for _ in range(reps + 1):  # the first round warms up
        for name, (x, y) in pairs.items():
            t = time.perf_counter()
            x @ y.T
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def _decide_cpu() -> dict:
    proc = _proc_cpu_flags()
    from_torch = _torch_cpu_flags()
    flags = None if proc is None and from_torch is None else (proc or set()) | (from_torch or set())
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
    onednn = _onednn_bf16()
    dtype, reason = decide_cpu_dtype(flags, onednn, x86)
    report = {
        "device": "cpu",
        "machine": platform.machine(),
        "cpu_flags": sorted(f for f in (flags or ()) if f in _SHOWN_FLAGS),
        "flags_from": [
            n for n, f in (("/proc/cpuinfo", proc), ("torch.cpu", from_torch)) if f is not None
        ],
        "onednn_bf16": onednn,
    }
    if dtype is None:
        times = _benchmark_gemm()
        dtype, reason = decide_by_benchmark(times)
        report["benchmark_s"] = {k: round(v, 6) for k, v in times.items()}
    report.update(dtype=str(dtype).removeprefix("torch."), reason=reason)
    return report


def candidate_dtype_report(device: torch.device | str = "cpu") -> dict:
    """The candidate GEMM dtype for `device` and why (JSON-ready, for run provenance).

    CPU: bfloat16 where the CPU has native bfloat16 matrix instructions (avx512_bf16 or
    AMX, from /proc/cpuinfo and torch's CPU probe), float32 where it has not; where the
    flags cannot tell (not x86, or no flags), a one-time micro-benchmark of both decides.
    Decided once per process. GPU: float32 (fast enough, keeps the re-score window narrow).
    """
    global _CPU_CHOICE
    if torch.device(device).type != "cpu":
        return {"device": torch.device(device).type, "dtype": "float32", "reason": "GPU: float32"}
    if _CPU_CHOICE is None:
        _CPU_CHOICE = _decide_cpu()
    return dict(_CPU_CHOICE)


def candidate_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the candidate GEMM on `device` (see `candidate_dtype_report`)."""
    return getattr(torch, candidate_dtype_report(device)["dtype"])
