"""Speed and memory of one training step: full fine-tuning vs the PEFT methods vs VPTSP-G.

Each variant is built by the suite's own `vpt_dml.models.build.build_model` (the same
assembly as training: fused or two-pass step, checkpointing, frozen-weight dtype,
compile) with ProxyAnchorLoss and AdamW over the trainable parameters, and runs forward +
backward + optimizer step on random images, class-balanced labels (k per class).

    python experiments/bench_train_step.py                 # CPU: ViT-S/16, batch 16, fp32
    python experiments/bench_train_step.py --device cuda   # GPU: ViT-B/16, batch 64, bf16 autocast
    python experiments/bench_train_step.py --quick         # a short run

Timing: all variants stay built and are timed round-robin (the order rotated every
round), so machine load hits them alike; the median round gives images/s. Ratios are to
full fine-tuning in the same run.
Memory (each variant alone): on CUDA torch.cuda.max_memory_allocated over a step; on
every device also an estimate that needs no allocator: bytes of the tensors autograd
keeps for backward at the end of forward (saved_tensors_hooks, de-duplicated by storage,
parameters excluded) + parameters + gradients + optimizer state.
FLOPs: each variant's forward + backward is counted once by torch's FlopCounterMode
(GEMMs, convolutions and scaled-dot-product attention; on CPU the attention kernel is
registered here, torch counts it only on CUDA), so `flops_vs_full_ft` is the arithmetic
floor of the time ratio, and `time_vs_flop_floor` the overhead beyond it.
Imports only torch, timm and vpt_dml.models / vpt_dml.losses (no hydra, lightning, ...).

The hand count the counter is checked against (tests/unit/test_flop_count.py), in
multiply-adds per image (x2 for FLOPs), for a ViT of L blocks, width d, MLP ratio r,
T = N patches + k prefix tokens, patch p, c channels; P_l prompts at block l:

    linear(T)      = (4 + 2r) d^2 T             qkv 3, proj 1, MLP 2r (timm's Block)
    attention(T,S) = 2 T S d                    q k^T and a v, T queries over S keys
    embed          = N c p^2 d                  the patch convolution

  full fine-tuning: forward sum_l [linear(T) + attention(T, T)] + embed; backward 2x the
    linears (input and weight gradients), 2.5x attention (the flash kernels' backward
    recomputes q k^T: torch's own formula), 1x embed (weight gradient only):
        3 sum_l linear(T) + 3.5 sum_l attention(T, T) + 2 embed
  one prompted branch of the fused pass (PromptedViT._branch_block): prompts only join
    the keys and values, and the last block computes only the k prefix tokens' outputs:
        F_l = (2 + 2r) d^2 T_l + 2 d^2 (T + P_l) + attention(T_l, T + P_l),
        T_l = T for l < L - 1, T_{L-1} = k;
    frozen weights: backward 1x the linears (input gradients only), 2.5x attention.
  VPTSP-G (fused): two such branches (image prompts P, class prompts Q) over one shared
    embedding, no backward through the embedding:
        sum_branches sum_l [2 lin_l + 3.5 att_l] + embed
  Heads, GRU, proxies and the loss are left out (under 1% on the ViTs benchmarked).
  P = 10, Q = 3 on every block, 224 px: VPTSP-G / full fine-tuning = 1.30 (ViT-S/16) and
  1.28 (ViT-B/16): the floor under the measured time ratio (1.87 on an H200, issue 8).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vpt_dml.losses import ProxyAnchorLoss  # noqa: E402
from vpt_dml.models.build import build_model  # noqa: E402
from vpt_dml.optim import device_step_kwargs  # noqa: E402

NUM_CLASSES = 100  # CUB's training classes
PROMPTS = {"num": 10, "depth": "all", "step": 0}  # CUB ViT-S preset: P (12 blocks)
CLASS_PROMPTS = {"num": 3, "depth": "all", "step": 0}  # and Q
NO_PROMPTS = {"num": 0, "depth": 0, "step": 0}


@dataclass
class Variant:
    name: str
    peft: dict
    semantic: bool = False  # semantic proxies (VPTSP-G) instead of learned ones
    fused: bool = False  # both branches as one 2B pass (PromptedViT.forward_branches)
    checkpointing: bool | float = False  # True, False or the fraction of layers
    frozen_bf16: bool = False  # frozen weights stored in bf16 once (models/precision.py)
    compile: bool = False
    trainable: int = 0
    flops: int = 0  # forward + backward of one batch (FlopCounterMode)
    built: dict = field(default_factory=dict)


def variants(args) -> list[Variant]:
    vptsp = {"prompts": PROMPTS, "bitfit": True}
    out = [
        Variant("full_ft", {"full": True, "prompts": NO_PROMPTS}),
        Variant("linear", {"prompts": NO_PROMPTS}),
        Variant("bitfit", {"bitfit": True, "prompts": NO_PROMPTS}),
        Variant("vpt_deep", {"prompts": PROMPTS}),
        Variant("vptsp_g_two_pass", vptsp, semantic=True),
        Variant("vptsp_g", vptsp, semantic=True, fused=True),
        Variant("vptsp_g_ckpt", vptsp, semantic=True, fused=True, checkpointing=True),
        Variant("vptsp_g_ckpt_half", vptsp, semantic=True, fused=True, checkpointing=0.5),
    ]
    if args.autocast:
        out.append(
            Variant("vptsp_g_bf16_frozen", vptsp, semantic=True, fused=True, frozen_bf16=True)
        )
    if args.compile:
        out.append(Variant("vptsp_g_compiled", vptsp, semantic=True, fused=True, compile=True))
    return out


def build(v: Variant, args) -> None:
    """Model, optimizer and the step function of one variant (stored in v.built)."""
    torch.manual_seed(0)
    proxy = {"kind": "semantic_gru", "bias_ratio": 0.5, "class_prompts": CLASS_PROMPTS}
    cfg = {
        "model": {
            "backbone": {
                "name": args.model,
                "pretrained": False,
                "weights": None,
                "kwargs": dict(getattr(args, "model_kwargs", None) or {}),
            },
            "peft": v.peft,
            "embed_dim": args.embed_dim,
            "proxy": proxy if v.semantic else {"kind": "learned"},
            "fused_branches": v.fused,
            "grad_checkpointing": v.checkpointing,
            "frozen_weights_dtype": "bfloat16" if v.frozen_bf16 else None,
            "compile": v.compile,  # the inner network only, as in training (DESIGN.md)
        },
        "loss": {"positive_normalization": "all"},
    }
    model = build_model(cfg, NUM_CLASSES)
    assert model.fused == v.fused, f"{v.name}: build_model chose fused={model.fused}"
    embedder = model.embedder.to(args.device).train()
    proxies = model.proxies.to(args.device).train()
    params = [p for m in (embedder, proxies) for p in m.parameters() if p.requires_grad]
    # as configure_optimizers: fused AdamW on CUDA
    opt_kwargs = device_step_kwargs(torch.optim.AdamW, torch.device(args.device))
    opt = torch.optim.AdamW(params, lr=1e-4, **opt_kwargs)
    loss_fn = ProxyAnchorLoss(positive_normalization="all")

    def forward(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast(args):
            emb, prox = model.training_outputs(images, labels)  # VPTDMLModule.training_step's
            return loss_fn(emb, labels, prox)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        loss = forward(images, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    v.built = {
        "embedder": embedder,
        "proxies": proxies,
        "opt": opt,
        "forward": forward,
        "step": step,
        "trainable": sum(p.numel() for p in params),
    }


def autocast(args):
    if not args.autocast:
        return contextlib.nullcontext()
    return torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16)


def make_batch(args, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(args.batch, 3, 224, 224, generator=g)
    classes = torch.randperm(NUM_CLASSES, generator=g)[: args.batch // args.k]
    labels = classes.repeat_interleave(args.k)  # class-balanced: k per class, contiguous
    return images.to(args.device), labels.to(args.device)


def sync(args) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def state_bytes(v: Variant) -> int:
    """Parameters + gradients (trainable) + optimizer state, as allocated now."""
    b = v.built
    params = [p for m in (b["embedder"], b["proxies"]) for p in m.parameters()]
    total = sum(p.numel() * p.element_size() for p in params)
    total += sum(p.numel() * p.element_size() for p in params if p.requires_grad)  # grads
    for st in b["opt"].state.values():
        total += sum(t.numel() * t.element_size() for t in st.values() if torch.is_tensor(t))
    return total


def saved_activation_bytes(v: Variant, batch) -> int:
    """Bytes autograd holds for backward at the end of forward (parameters excluded)."""
    b = v.built
    param_ptrs = {
        p.untyped_storage().data_ptr()
        for m in (b["embedder"], b["proxies"])
        for p in m.parameters()
    }
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = b["forward"](*batch)
    nbytes = sum(seen.values())
    loss.backward()
    b["opt"].zero_grad(set_to_none=True)
    return nbytes


def measure_memory(v: Variant, args, batch) -> dict:
    step = v.built["step"]
    step(*batch)  # optimizer state exists from here on
    out = {"saved_activations_mb": saved_activation_bytes(v, batch) / 2**20}
    out["state_mb"] = state_bytes(v) / 2**20
    out["estimate_mb"] = out["saved_activations_mb"] + out["state_mb"]
    if args.device.startswith("cuda"):
        sync(args)
        torch.cuda.reset_peak_memory_stats()
        step(*batch)
        sync(args)
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["host_syncs_per_step"] = count_syncs(step, batch)
    return out


def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's FlopCounterMode counts the CUDA attention kernels only
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}


def count_flops(v: Variant, batch) -> int:
    """FLOPs of one forward + backward of the variant (the optimizer step has no GEMM)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        v.built["forward"](*batch).backward()
    for p in v.built["opt"].param_groups[0]["params"]:
        p.grad = None
    return int(counter.get_total_flops())


def hand_flops(vit, prompts: list[int], branches: list[list[int]] | None) -> int:
    """The docstring's count for one image: full fine-tuning (`branches` None, `prompts`
    ignored) or the fused pass over `branches` (per-block prompt counts of each)."""
    L = len(vit.blocks)
    d = vit.embed_dim
    r = vit.blocks[0].mlp.fc1.out_features / d
    k = vit.num_prefix_tokens
    n = vit.patch_embed.num_patches
    t = n + k
    conv = vit.patch_embed.proj
    embed = n * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * d
    if branches is None:
        lin = (4 + 2 * r) * d * d * t
        att = 2 * t * t * d
        return int(2 * (L * (3 * lin + 3.5 * att) + 2 * embed))
    macs = embed
    for counts in branches:
        for layer, p in enumerate(counts):
            t_out = k if layer == L - 1 else t
            lin = (2 + 2 * r) * d * d * t_out + 2 * d * d * (t + p)
            macs += 2 * lin + 3.5 * 2 * t_out * (t + p) * d
    return int(2 * macs)


def count_syncs(step: Callable, batch) -> int:
    """Synchronising CUDA calls in one step (torch's sync debug mode warns on each)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(*batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def run(args) -> dict:
    vs = variants(args)
    batches = [make_batch(args, seed) for seed in range(2)]
    memory = {}
    for v in vs:  # memory: one variant on the device at a time
        build(v, args)
        memory[v.name] = measure_memory(v, args, batches[0])
        v.flops = count_flops(v, batches[0])
        v.trainable = v.built["trainable"]
        v.built = {}
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        print(
            f"memory {v.name}: {json.dumps({k: round(x, 1) for k, x in memory[v.name].items()})}",
            flush=True,
        )
    for v in vs:
        build(v, args)
        for i in range(args.warmup):
            v.built["step"](*batches[i % 2])
    sync(args)
    times: dict[str, list[float]] = {v.name: [] for v in vs}
    for r in range(args.rounds):
        order = vs[r % len(vs) :] + vs[: r % len(vs)]
        for v in order:
            sync(args)
            t0 = time.perf_counter()
            for i in range(args.steps):
                v.built["step"](*batches[i % 2])
            sync(args)
            times[v.name].append((time.perf_counter() - t0) / args.steps)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    return report(vs, times, memory, args)


def report(vs, times, memory, args) -> dict:
    base_t = statistics.median(times["full_ft"])
    base_f = next(v.flops for v in vs if v.name == "full_ft")
    mem_key = "cuda_peak_mb" if args.device.startswith("cuda") else "estimate_mb"
    base_m = memory["full_ft"][mem_key]
    rows = {}
    for v in vs:
        t = statistics.median(times[v.name])
        rows[v.name] = {
            "step_s": round(t, 4),
            "step_s_all_rounds": [round(x, 4) for x in times[v.name]],
            "images_per_s": round(args.batch / t, 2),
            "time_vs_full_ft": round(t / base_t, 3),
            "gflops_per_step": round(v.flops / 1e9, 3),
            "flops_vs_full_ft": round(v.flops / base_f, 3),
            # measured time ratio over the arithmetic one: 1.0 = at the FLOP floor
            "time_vs_flop_floor": round((t / base_t) / (v.flops / base_f), 3),
            "memory_mb": round(memory[v.name][mem_key], 1),
            "memory_vs_full_ft": round(memory[v.name][mem_key] / base_m, 3),
            "trainable_params": v.trainable,
            **{k: round(x, 1) for k, x in memory[v.name].items()},
        }
    print(
        f"\n{'variant':22s} {'img/s':>8s} {'x time':>7s} {'x flops':>8s} {'/floor':>7s} "
        f"{'mem MB':>9s} {'x mem':>6s} {'trainable':>11s}"
    )
    for name, r in rows.items():
        print(
            f"{name:22s} {r['images_per_s']:8.2f} {r['time_vs_full_ft']:7.3f} "
            f"{r['flops_vs_full_ft']:8.3f} {r['time_vs_flop_floor']:7.3f} {r['memory_mb']:9.1f} "
            f"{r['memory_vs_full_ft']:6.3f} {r['trainable_params']:11d}"
        )
    g = rows["vptsp_g"]
    ck = rows["vptsp_g_ckpt"]
    return {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "model": args.model,
        "batch": args.batch,
        "k": args.k,
        "dtype": "bf16-autocast" if args.autocast else "fp32",
        "memory_metric": mem_key,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "variants": rows,
        "targets": {
            "vptsp_g_time_vs_full_ft<=1.25": g["time_vs_full_ft"],
            "vptsp_g_memory_vs_full_ft<=1": g["memory_vs_full_ft"],
            "ckpt_memory_vs_vptsp_g<=0.6": round(ck["memory_mb"] / g["memory_mb"], 3),
            "ckpt_time_vs_vptsp_g<=1.35": round(ck["step_s"] / g["step_s"], 3),
            "ckpt_half_memory_vs_vptsp_g": round(
                rows["vptsp_g_ckpt_half"]["memory_mb"] / g["memory_mb"], 3
            ),
            "ckpt_half_time_vs_vptsp_g": round(
                rows["vptsp_g_ckpt_half"]["step_s"] / g["step_s"], 3
            ),
            "fused_time_vs_two_pass": round(g["step_s"] / rows["vptsp_g_two_pass"]["step_s"], 3),
        },
        # must stay empty: the GPU machine has none of these (timm itself may import
        # lightning / wandb where they are installed; both are optional there)
        "heavy_modules_imported": [
            m
            for m in ("hydra", "omegaconf", "faiss", "pytorch_metric_learning")
            if m in sys.modules
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    ap.add_argument(
        "--model", default=None, help="timm name (default: ViT-S/16 on CPU, ViT-B/16 on GPU)"
    )
    ap.add_argument("--batch", type=int, default=None, help="default 16 on CPU, 64 on GPU")
    ap.add_argument("--k", type=int, default=2, help="images per class")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="steps per variant per round")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="add a torch.compile'd VPTSP-G variant")
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    args.model = args.model or ("vit_base_patch16_224" if gpu else "vit_small_patch16_224")
    args.embed_dim = 512 if "base" in args.model else 384
    args.batch = args.batch or (64 if gpu else 16)
    args.autocast = gpu  # bf16 on CPU is slow: the CPU run is fp32
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    q = args.quick
    args.rounds = args.rounds or (2 if q else (5 if gpu else 3))
    args.steps = args.steps or (1 if not gpu else (3 if q else 5))
    args.warmup = args.warmup if args.warmup is not None else (2 if not gpu else 3)
    torch.set_float32_matmul_precision("high")
    result = run(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
