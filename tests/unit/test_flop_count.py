"""experiments/bench_train_step.py's FLOP floor: torch's FlopCounterMode on the suite's own
step against the hand count in the benchmark's docstring."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from conftest import load_experiment

REPO = Path(__file__).resolve().parents[2]


bench = load_experiment("bench_train_step")

# 4 blocks, 64 patches + CLS, width 64: the backbone dominates heads, GRU and loss
ARGS = argparse.Namespace(
    model="vit_tiny_patch16_224",
    model_kwargs={"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2},
    device="cpu",
    embed_dim=16,
    autocast=False,
    compile=False,
    batch=8,
    k=2,
)


def _counted(name: str) -> tuple[int, object]:
    v = next(v for v in bench.variants(ARGS) if v.name == name)
    bench.build(v, ARGS)
    images, labels = bench.make_batch(ARGS, 0)
    images = images[:, :, :32, :32].contiguous()
    return bench.count_flops(v, (images, labels)), v.built["embedder"].backbone.vit


def test_counted_flops_of_full_fine_tuning_and_vptsp_g_match_the_hand_count():
    full, vit = _counted("full_ft")
    fused, _ = _counted("vptsp_g")
    layers = len(vit.blocks)
    hand_full = ARGS.batch * bench.hand_flops(vit, [], None)
    branches = [[bench.PROMPTS["num"]] * layers, [bench.CLASS_PROMPTS["num"]] * layers]
    hand_fused = ARGS.batch * bench.hand_flops(vit, [], branches)
    assert full == pytest.approx(hand_full, rel=0.05)
    assert fused == pytest.approx(hand_fused, rel=0.05)
    assert fused / full == pytest.approx(hand_fused / hand_full, rel=0.05)
    # the fused pass's savings are real: four full passes over three would be 1.33
    assert fused / full < 0.95 * 4 / 3


def test_attention_is_counted_on_cpu():
    """Without the CPU attention formulas the count misses every q k^T and a v."""
    full, vit = _counted("full_ft")
    t = vit.patch_embed.num_patches + vit.num_prefix_tokens
    attention = ARGS.batch * len(vit.blocks) * 3.5 * 2 * (2 * t * t * vit.embed_dim)
    saved = dict(bench.CPU_ATTENTION_FLOPS)
    bench.CPU_ATTENTION_FLOPS.clear()
    try:
        without, _ = _counted("full_ft")
    finally:
        bench.CPU_ATTENTION_FLOPS.update(saved)
    assert full - without == pytest.approx(attention, rel=1e-6)  # float64
