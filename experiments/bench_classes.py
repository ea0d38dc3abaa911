"""Step time and device-resident class-prompt memory vs the number of classes C.

The class-prompt path of a VPTSP-G step (batch rows to the device, ViT forward with
per-sample class prompts, backward, optimizer update) at a small and a large C with the
same batch, for
  store: the host class-prompt store (rows of the batch only, row-wise AdamW),
  dense: an all-on-device (C, M, D) table per layer with a dense torch AdamW.
The configurations are timed interleaved (round-robin) so machine load drifts hit all
of them alike; medians are reported. Ratios are against C = the smallest --classes.

    python experiments/bench_classes.py                  # cuda if available, else cpu
    python experiments/bench_classes.py --device cuda --dim 384 --depth 12 --img 224 --patch 16

Needs only torch, timm, numpy (the model parts come from vpt_dml.models.build). Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vpt_dml.models.build import build_embedder, build_proxies  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--classes", type=int, nargs="+", default=[100, 11318])
    p.add_argument(
        "--batch", type=int, default=32, help="samples per step, one per class (SOP: k=1)"
    )
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--img", type=int, default=32)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument(
        "--prompts", type=int, default=5, help="class prompts per layer (M), on every layer"
    )
    p.add_argument("--storage", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-dense", action="store_true", help="skip the dense contrast")
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Setup:
    """One configuration: a frozen tiny ViT and C classes' prompts, store or dense."""

    def __init__(self, args, num_classes: int, mode: str, device: torch.device) -> None:
        self.device, self.mode, self.num_classes, self.batch = device, mode, num_classes, args.batch
        torch.manual_seed(0)
        kwargs = dict(
            img_size=args.img,
            patch_size=args.patch,
            embed_dim=args.dim,
            depth=args.depth,
            num_heads=args.heads,
        )
        model_cfg = {"backbone": {"name": "vit_tiny_patch16_224", "kwargs": kwargs}, "peft": {}}
        # frozen ViT without shared prompts: the class-prompt traffic dominates
        self.model = build_embedder(model_cfg).backbone.to(device)
        proxy_cfg = {
            "kind": "semantic_gru",
            "class_prompts": {"num": args.prompts, "depth": args.depth, "step": 0},
            "class_prompt_store": "host" if mode == "store" else "device",
            "class_prompt_dtype": args.storage,
        }
        class_prompts = build_proxies(
            proxy_cfg, num_classes, args.dim, args.dim, args.depth
        ).class_prompts
        self.group = {"lr": 1e-4, "weight_decay": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8}
        if mode == "store":
            self.store = class_prompts.store.train()
        else:
            self.tables = class_prompts.tokens.to(device)
            self.opt = torch.optim.AdamW(self.tables.parameters(), lr=1e-4, weight_decay=1e-4)
        self.images = torch.randn(args.batch, 3, args.img, args.img, device=device)
        self.gen = torch.Generator().manual_seed(1)

    def step(self) -> None:
        labels = torch.randperm(self.num_classes, generator=self.gen)[: self.batch].to(self.device)
        if self.mode == "store":
            self.store.prefetch(labels, self.device)
            prompts = self.store.gather(labels)
        else:
            prompts = [t[labels] for t in self.tables]
        loss = self.model(self.images, prompts).pow(2).mean()
        loss.backward()
        if self.mode == "store":
            self.store.step(self.group, "adamw")
        else:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def device_prompt_bytes(self) -> int:
        """Class-prompt bytes resident on the device during a step (values, grads, moments)."""
        if self.mode == "store":
            return self.store.last_device_bytes
        n = sum(t.numel() * t.element_size() for t in self.tables)
        return 4 * n  # parameter, gradient, two Adam moments

    def timed(self, steps: int) -> float:
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return (time.perf_counter() - start) / steps


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    modes = ["store"] if args.no_dense else ["store", "dense"]
    setups = {(m, c): Setup(args, c, m, device) for m in modes for c in args.classes}
    peak = {}
    for key, s in setups.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        for _ in range(args.warmup):
            s.step()
        if device.type == "cuda":
            peak[key] = torch.cuda.max_memory_allocated(device) - base
    times: dict[tuple[str, int], list[float]] = {k: [] for k in setups}
    for _ in range(args.rounds):
        for key, s in setups.items():
            times[key].append(s.timed(args.steps))

    small, large = min(args.classes), max(args.classes)
    result = {
        "device": str(device),
        "batch": args.batch,
        "dim": args.dim,
        "depth": args.depth,
        "prompts_per_layer": args.prompts,
        "storage": args.storage,
        "classes": args.classes,
    }
    for m in modes:
        for c in args.classes:
            ms = 1000 * statistics.median(times[(m, c)])
            mib = setups[(m, c)].device_prompt_bytes() / 2**20
            result[f"{m}_step_ms_C{c}"] = round(ms, 3)
            result[f"{m}_prompt_device_MiB_C{c}"] = round(mib, 3)
            if (m, c) in peak:
                result[f"{m}_peak_alloc_MiB_C{c}"] = round(peak[(m, c)] / 2**20, 3)
            print(f"{m:>5}  C={c:>6}  step {ms:9.2f} ms  class prompts on device {mib:10.3f} MiB")
        ratio = statistics.median(times[(m, large)]) / statistics.median(times[(m, small)])
        result[f"{m}_step_ratio_C{large}_vs_C{small}"] = round(ratio, 3)
        print(f"{m:>5}  step time C={large} / C={small}: {ratio:.3f}x")
    if "dense" in modes:
        r = statistics.median(times[("dense", large)]) / statistics.median(times[("store", large)])
        result[f"dense_over_store_step_C{large}"] = round(r, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
