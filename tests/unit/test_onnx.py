"""ONNX export of the inference-time embedder: onnxruntime equals PyTorch (issue 25)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import compose_config, tiny_overrides
from vpt_dml.errors import UserError
from vpt_dml.models.build import build_embedder
from vpt_dml.serving.onnx_export import export_onnx, peft_method, run_onnx


def tuned_embedder(peft: str, tmp_path: Path, seed: int = 0):
    """The tiny ViT with `peft`, every trainable tensor set to random values (as if
    trained: LoRA's B and the adapters' up-projections start at zero)."""
    cfg = compose_config(tiny_overrides(f"model/peft={peft}"), tmp_path)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    torch.manual_seed(seed)
    embedder = build_embedder(model_cfg).eval()
    base = {k: v.clone() for k, v in embedder.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in embedder.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return embedder, base, peft_method(model_cfg)


@pytest.mark.parametrize("peft", ["vptsp", "lora", "adapter", "linear", "full"])
def test_onnx_equals_pytorch(peft: str, tmp_path: Path) -> None:
    embedder, base, method = tuned_embedder(peft, tmp_path)
    out = tmp_path / "m.onnx"
    report = export_onnx(embedder, 32, out, method)
    assert report["max_abs_diff"] <= 1e-4
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = embedder(images).numpy()
    got = run_onnx(out, images.numpy())  # a batch size the export never saw
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=0, atol=1e-5)
    # the tuned tensors are in the graph: without them the output is another one
    embedder.load_state_dict(base)
    with torch.no_grad():
        assert np.abs(embedder(images).numpy() - got).max() > 1e-2


def test_an_export_outside_the_bound_is_refused_in_one_line(tmp_path: Path) -> None:
    embedder, _, method = tuned_embedder("lora", tmp_path)
    out = tmp_path / "m.onnx"
    with pytest.raises(UserError, match=r"differs from PyTorch by .* \(bound 1e-12\)") as e:
        export_onnx(embedder, 32, out, method, atol=1e-12)
    assert "\n" not in str(e.value) and not out.exists()
