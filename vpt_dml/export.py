"""`python -m vpt_dml.export RUN_DIR OUT.safetensors`: ship only what training tuned.

The file holds the tuned tensors of the image branch (prompts, BitFit biases, head,
adapters / LoRA: whatever had requires_grad), the run's model config and a fingerprint
of the frozen backbone. Loading rebuilds the backbone from timm by name (pretrained as
in the config, or from a local weights file), checks the fingerprint and refuses a
different backbone. Class prompts, GRU, H and the proxy bias are training aids and are
left out (inference uses the image branch only).

A run on a random-init backbone (`pretrained=false`, no weights file) cannot be rebuilt
by name: timm's init differs on every build. Its frozen tensors are written too
(metadata `frozen_included`), so the file loads back on its own; `--onnx` writes the
whole inference-time embedder for another runtime (serving/onnx_export.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vpt_dml.errors import UserError
from vpt_dml.serving.exported import export_run, export_run_onnx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vpt_dml.export", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "run_dir", type=Path, help="run folder of vpt_dml.run (holds config_resolved.yaml)"
    )
    parser.add_argument("out", type=Path, nargs="?", help="output .safetensors file")
    parser.add_argument(
        "--checkpoint",
        default="last",
        help="last (default), best (the one the run's metrics.json names), or a .ckpt path",
    )
    parser.add_argument(
        "--onnx", type=Path, help="also (or only) write the embedder as ONNX to this file"
    )
    parser.add_argument(
        "--onnx-exporter",
        default="tracer",
        choices=("tracer", "dynamo"),
        help="torch.onnx's TorchScript tracer (default) or its dynamo exporter",
    )
    args = parser.parse_args(argv)
    try:
        if args.out is None and args.onnx is None:
            raise UserError("give OUT.safetensors, --onnx OUT.onnx, or both")
        report = export_run(args.run_dir, args.out, args.checkpoint) if args.out else None
        onnx = (
            export_run_onnx(args.run_dir, args.onnx, args.checkpoint, args.onnx_exporter)
            if args.onnx
            else None
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if report:
        ratio = report["checkpoint_bytes"] / report["export_bytes"]
        print(
            f"wrote {args.out}: {report['tuned_parameters']:,} tuned parameters, "
            f"{report['export_bytes'] / 1e6:.2f} MB ({ratio:.0f}x smaller than "
            f"{report['checkpoint']})"
        )
        if report["frozen_included"]:
            print(
                f"the run's backbone is a random init (no hub weights, no weights file): its "
                f"{report['frozen_included']} frozen tensors are in {args.out} too, so it "
                "loads back"
            )
    if onnx:
        print(
            f"wrote {args.onnx} ({onnx['method']}, {onnx['bytes'] / 1e6:.2f} MB, input "
            f"(batch, 3, {onnx['image_size']}, {onnx['image_size']})): onnxruntime vs PyTorch "
            f"on {onnx['check_batch']} images, max abs diff {onnx['max_abs_diff']:.2e} "
            f"(bound {onnx['atol']:.0e})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
