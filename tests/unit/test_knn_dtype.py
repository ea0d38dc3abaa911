"""The CPU candidate dtype: bfloat16 only where the CPU multiplies it natively."""

from __future__ import annotations

import pytest
import torch

from vpt_dml.evaluation import candidate_dtype_report, knn
from vpt_dml.evaluation.knn import dtype_choice

# AVX-512 without bf16 (Skylake/Cascade Lake-like: oneDNN emulates bf16, ~2x slower)
AVX512_ONLY = {"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}


@pytest.mark.parametrize(
    "flags, onednn, x86, want, why",
    [
        (AVX512_ONLY, True, True, torch.float32, "would be emulated"),
        (AVX512_ONLY | {"avx512_bf16"}, True, True, torch.bfloat16, "(avx512_bf16)"),  # Zen 4
        (
            AVX512_ONLY | {"avx512_bf16", "amx_tile", "amx_bf16"},
            True,
            True,
            torch.bfloat16,
            "amx_bf16",
        ),
        ({"avx", "avx2", "fma"}, False, True, torch.float32, "no bfloat16 GEMM"),  # no AVX-512
        (AVX512_ONLY | {"avx512_bf16"}, False, True, torch.float32, "no bfloat16 GEMM"),
        (None, True, True, None, "unknown from the CPU flags: measured"),  # flags unknown
        ({"fp", "asimd", "sve", "bf16"}, True, False, None, "measured"),  # ARM: measure
    ],
)
def test_decision_from_flags(flags, onednn, x86, want, why):
    """The dtype, and a reason that names what decided it (shown in metrics.json)."""
    dtype, reason = knn.decide_cpu_dtype(flags, onednn, x86)
    assert dtype == want
    assert why in reason, reason


@pytest.mark.parametrize(
    "bf16, fp32, want",
    [(0.010, 0.030, torch.bfloat16), (0.025, 0.030, torch.float32), (0.060, 0.030, torch.float32)],
)
def test_decision_from_benchmark(bf16, fp32, want):
    assert knn.decide_by_benchmark({"bfloat16": bf16, "float32": fp32})[0] == want


def test_proc_cpuinfo_flags_are_read(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert knn._proc_cpu_flags(str(info)) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    assert knn._proc_cpu_flags(str(tmp_path / "missing")) is None


@pytest.fixture
def fake_cpu(monkeypatch):
    """Replace the probes; count benchmark calls; start and end with a clean cache."""
    calls = []
    state = {"proc": AVX512_ONLY, "torch": set(), "onednn": True, "machine": "x86_64"}
    # the probes are globals of the module that reads them (not of the package)
    monkeypatch.setattr(dtype_choice, "_CPU_CHOICE", None)
    monkeypatch.setattr(dtype_choice, "_proc_cpu_flags", lambda: state["proc"])
    monkeypatch.setattr(dtype_choice, "_torch_cpu_flags", lambda: state["torch"])
    monkeypatch.setattr(dtype_choice, "_onednn_bf16", lambda: state["onednn"])
    monkeypatch.setattr(dtype_choice.platform, "machine", lambda: state["machine"])

    def bench():
        calls.append(1)
        return {"float32": 0.03, "bfloat16": 0.01}

    monkeypatch.setattr(dtype_choice, "_benchmark_gemm", bench)
    yield state, calls


def test_emulated_bf16_cpu_gets_float32(fake_cpu):
    report = candidate_dtype_report("cpu")
    assert report["dtype"] == "float32" and "emulated" in report["reason"]
    assert "avx512f" in report["cpu_flags"] and "avx512_bf16" not in report["cpu_flags"]
    assert knn.candidate_dtype(torch.device("cpu")) == torch.float32


def test_torch_probe_alone_finds_native_bf16(fake_cpu):
    state, calls = fake_cpu
    state["proc"], state["torch"] = None, {"amx_tile"}  # no /proc (e.g. not Linux)
    report = candidate_dtype_report("cpu")
    assert report["dtype"] == "bfloat16" and report["flags_from"] == ["torch.cpu"]
    assert not calls


def test_unknown_cpu_is_measured_once(fake_cpu):
    state, calls = fake_cpu
    state["proc"], state["torch"], state["machine"] = {"asimd", "bf16"}, None, "aarch64"
    assert candidate_dtype_report("cpu")["dtype"] == "bfloat16"
    assert candidate_dtype_report()["benchmark_s"] == {"float32": 0.03, "bfloat16": 0.01}
    assert knn.candidate_dtype(torch.device("cpu")) == torch.bfloat16
    assert len(calls) == 1  # cached per process


def test_gpu_uses_float32():
    assert candidate_dtype_report("cuda")["dtype"] == "float32"
    assert knn.candidate_dtype(torch.device("cuda")) == torch.float32
