"""The inference-time embedder of a run as ONNX, checked against PyTorch at export.

What is exported: images (B, 3, H, W) float32 -> L2-normalised embeddings (B, E), the
backbone with its tuned prompts, biases, adapters / LoRA and the head (the image branch;
the semantic branch's parts are training aids). The batch axis is dynamic.

Exporter: torch.onnx.export with dynamo=False (the TorchScript tracer) by default. Both
export every PEFT method here (vptsp, lora, adapter, linear, full) within 3e-7 of
PyTorch on the tiny ViT; the tracer took 0.4-3.5 s and wrote ~170 kB where the dynamo
exporter (torch 2.14's default) took 4.5-9.5 s and ~320 kB on this 2-core machine. The
embedder's eval path has no data-dependent control flow, so a trace is the whole graph,
and `dynamic_axes` gives the batch axis without torch.export's `Dim` constraints.
`--onnx-exporter dynamo` picks the other one (the check below runs either way).

The check: onnxruntime (CPU) runs the file on a batch of random images of another batch
size than the trace's, and the largest absolute difference from the PyTorch output must
be at most `atol` (1e-4 in fp32). Anything the exporter cannot express is refused in one
line naming the PEFT method.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from vpt_dml.errors import UserError
from vpt_dml.models.embedder import Embedder

ATOL = 1e-4
TRACE_BATCH = 2
CHECK_BATCH = 3  # another size than the trace's: the batch axis really is dynamic


def peft_method(model_cfg: Mapping) -> str:
    """A short name of the run's PEFT set-up, for messages."""
    peft = model_cfg.get("peft") or {}
    on = [k for k in ("full", "bitfit") if peft.get(k)]
    on += [k for k in ("adapter", "lora") if (peft.get(k) or {}).get("enabled")]
    if ((peft.get("prompts") or {}).get("num") or 0) > 0:
        on.append("prompts")
    return str(peft.get("name") or "+".join(on) or "linear")


class OnnxEmbedder(nn.Module):
    """What the file computes: the embedder in eval mode, float32 in and out."""

    def __init__(self, embedder: Embedder) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedder(images)


def _prepare(embedder: Embedder) -> nn.Module:
    embedder = embedder.float().eval()
    backbone = embedder.backbone
    if hasattr(backbone, "set_grad_checkpointing"):
        backbone.set_grad_checkpointing(False)  # a training-time memory trade, not a graph
    return OnnxEmbedder(embedder).eval()


def export_onnx(
    embedder: Embedder,
    image_size: int,
    out: Path,
    method: str,
    exporter: str = "tracer",
    atol: float = ATOL,
    seed: int = 0,
) -> dict:
    """Write `out` and check it with onnxruntime; returns {max_abs_diff, batch, ...}."""
    if exporter not in ("tracer", "dynamo"):
        raise UserError(f"--onnx-exporter {exporter!r}; use tracer or dynamo")
    model = _prepare(embedder)
    g = torch.Generator().manual_seed(seed)
    trace = torch.randn(TRACE_BATCH, 3, image_size, image_size, generator=g)
    check = torch.randn(CHECK_BATCH, 3, image_size, image_size, generator=g)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if exporter == "tracer":
                torch.onnx.export(
                    model,
                    (trace,),
                    str(out),
                    input_names=["images"],
                    output_names=["embeddings"],
                    dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
                    opset_version=17,
                    dynamo=False,
                )
            else:
                batch = torch.export.Dim("batch", min=1, max=4096)
                torch.onnx.export(
                    model,
                    (trace,),
                    str(out),
                    input_names=["images"],
                    output_names=["embeddings"],
                    dynamic_shapes={"images": {0: batch}},
                    dynamo=True,
                    external_data=False,
                )
    except Exception as e:  # noqa: BLE001 - any exporter failure: this model cannot go
        out.unlink(missing_ok=True)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(
            f"PEFT method {method} cannot be exported to ONNX with the {exporter} exporter "
            f"({type(e).__name__}: {first}); use the .safetensors export with vpt_dml.embed"
        ) from None
    with torch.no_grad():
        expected = model(check).numpy()
    got = run_onnx(out, check.numpy())
    if got.shape != expected.shape:
        out.unlink(missing_ok=True)
        raise UserError(
            f"the ONNX file gives shape {got.shape} for a batch of {CHECK_BATCH}, PyTorch "
            f"{expected.shape}; PEFT method {method} does not export with a dynamic batch"
        )
    diff = float(np.abs(got - expected).max())
    if not diff <= atol:
        out.unlink(missing_ok=True)
        raise UserError(
            f"the ONNX export of PEFT method {method} differs from PyTorch by {diff:.2e} "
            f"(bound {atol:.0e}) on a batch of {CHECK_BATCH}; it is not written"
        )
    return {
        "file": str(out),
        "bytes": out.stat().st_size,
        "max_abs_diff": diff,
        "atol": atol,
        "check_batch": CHECK_BATCH,
        "exporter": exporter,
        "method": method,
    }


def run_onnx(path: Path, images: np.ndarray) -> np.ndarray:
    """The file's embeddings of `images` with onnxruntime on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: images.astype(np.float32)})[0]
