"""experiments/bench_*.py on the device, within what is left of the budget."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .processes import REPO, run_logged, tail


def run_bench(label: str, cmd: list[str], work: Path, cpu: bool, timeout: float) -> dict:
    log_path = work / f"{label}.log"
    print(f"[{label}] {' '.join(cmd[1:])}")
    t = time.perf_counter()
    rc = run_logged(cmd, log_path, cpu, timeout)
    out = {"cmd": " ".join(cmd[1:]), "rc": rc, "wall_s": round(time.perf_counter() - t, 1)}
    out["log"] = str(log_path)
    lines = log_path.read_text(errors="replace").strip().splitlines() if log_path.is_file() else []
    try:
        out["result"] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        out["result"] = None
    if rc != 0 or out["result"] is None:
        out["failure"] = f"{label}: exited with {rc}; last lines:\n{tail(log_path)}"
    return out


def benches(args, work: Path, deadline: float) -> dict:
    py, exp = sys.executable, REPO / "experiments"
    if args.skip_bench:  # one entry like the others (label -> result), not a bare string
        return {"benches": {"skipped": "--skip-bench"}}
    if args.cpu:
        plan = [
            (
                "bench_eval",
                [py, str(exp / "bench_eval.py"), "--device", "cpu", "--n", "2000"]
                + ["--classes", "400", "--dim", "32", "--skip-pml"],
                60,
            )
        ]
        skipped = {
            "bench_train_step": "skipped on CPU: it has no image-size or depth flags, and its "
            "smallest model (ViT-Ti at 224 px, 9 variants) takes minutes on 2 shared cores"
        }
    else:
        # order: the step-time target (batch 64), sop_deep's batch, then retrieval
        plan = [
            ("bench_train_step", [py, str(exp / "bench_train_step.py"), "--device", "cuda"], 90),
            (
                "bench_train_step_b32",
                [py, str(exp / "bench_train_step.py"), "--device", "cuda", "--quick"]
                + ["--batch", "32", "--k", "1"],
                60,
            ),
            ("bench_eval", [py, str(exp / "bench_eval.py"), "--device", "cuda", "--skip-pml"], 40),
        ]
        skipped = {}
    out = {label: {"skipped": reason} for label, reason in skipped.items()}
    for label, cmd, needs in plan:
        left = deadline - time.monotonic()
        if left < needs:
            out[label] = {"skipped": f"{left:.0f} s of the budget left, it needs about {needs} s"}
            continue
        out[label] = run_bench(label, cmd, work, args.cpu, left)
    return out


def describe_bench(label: str, b: dict) -> str:
    if "skipped" in b:
        return f"[{label}] skipped: {b['skipped']}"
    res = b.get("result") or {}
    if "variants" in res:
        v = res["variants"]
        rows = ", ".join(
            f"{k} {v[k]['images_per_s']} img/s ({v[k]['time_vs_full_ft']}x full FT time)"
            for k in ("full_ft", "vptsp_g")
            if k in v
        )
        return f"[{label}] {res.get('model')} batch {res.get('batch')}: {rows}"
    if "ours_s" in res:
        return f"[{label}] {res.get('n')} x {res.get('dim')}: {res['ours_s']} s, peak {res.get('ours_peak_gb')} GB"
    return f"[{label}] rc {b.get('rc')}, no result"


def sop_vs_bench(presets: dict, bench: dict) -> dict | None:
    """The issue's target: sop_deep's end-to-end images/s vs the bench's step at batch 32."""
    sop = presets.get("sop_deep") or {}
    b = ((bench.get("bench_train_step_b32") or {}).get("result") or {}).get("variants") or {}
    ips, step_ips = sop.get("train_images_per_s"), (b.get("vptsp_g") or {}).get("images_per_s")
    if not ips or not step_ips:
        return None
    return {
        "sop_deep_images_per_s": ips,
        "bench_vptsp_g_images_per_s_b32": step_ips,
        "ratio": round(ips / step_ips, 3),
        "note": "the bench step uses CUB ViT-S prompt counts (P=10, Q=3 on 12 layers), 100 "
        "classes, dense class prompts and random tensors; sop_deep uses P=90 step 5, Q=5 on "
        "8 layers and the host bank, fed by the DataLoader: indicative, not the same step",
    }
