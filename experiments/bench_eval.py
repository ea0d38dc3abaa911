"""Retrieval evaluation on SOP-sized data: ours vs pytorch-metric-learning, same embeddings.

    python experiments/bench_eval.py                 # 60,502 x 512, 11,316 classes
    python experiments/bench_eval.py --device cuda
    python experiments/bench_eval.py --n 8000 --classes 1500   # quick look

Data: realistic clustered embeddings, not uniform noise: 12 "super-categories" (as SOP),
class centres scattered around them, items = class centre + noise, L2-normalised; class
sizes 2..12 with SOP's mean of 5.35. The noise is set so Recall@1 lands near SOP's
published numbers, which puts many negatives close to the positives and exercises the
exact re-check honestly.

Needs only torch and numpy; pytorch-metric-learning (and faiss, which it uses) is optional:
without it the comparison is skipped with a message. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vpt_dml.evaluation import retrieval_metrics  # noqa: E402


def sop_like(n: int, classes: int, dim: int, seed: int, device: str):
    gen = torch.Generator().manual_seed(seed)
    # class sizes 2..12, mean n / classes (SOP: 60,502 / 11,316 = 5.35)
    sizes = torch.full((classes,), 2)
    while (extra := n - int(sizes.sum())) > 0:
        add = torch.bincount(torch.randint(classes, (extra,), generator=gen), minlength=classes)
        sizes = torch.minimum(sizes + add, torch.tensor(12))
    labels = torch.repeat_interleave(torch.arange(classes), sizes)
    labels = labels[torch.randperm(n, generator=gen)]
    # super-category directions, class centres around them, items around the class centres
    unit = dim**-0.5
    supers = torch.randn(12, dim, generator=gen) * unit
    spread = torch.randn(classes, dim, generator=gen) * unit
    centres = supers[torch.randint(12, (classes,), generator=gen)] + 0.7 * spread
    centres = torch.nn.functional.normalize(centres, dim=1)
    noise = torch.randn(n, dim, generator=gen) * unit
    x = torch.nn.functional.normalize(centres[labels] + 1.35 * noise, dim=1)
    return x.to(device), labels.to(device)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=60502)
    ap.add_argument("--classes", type=int, default=11316)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-pml", action="store_true", help="time our metrics only")
    args = ap.parse_args()
    device = args.device
    cuda = device.startswith("cuda")

    x, y = sop_like(args.n, args.classes, args.dim, args.seed, device)
    print(f"data: {args.n} x {args.dim}, {args.classes} classes, device {device}, "
          f"torch threads {torch.get_num_threads()}")
    rss_before = peak_rss_gb()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    ours = retrieval_metrics(x, y, ks=(1, 10, 100, 1000))
    if cuda:
        torch.cuda.synchronize()
    t_ours = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else peak_rss_gb()
    print(f"ours: {t_ours:.2f} s, peak {'GPU' if cuda else 'process RSS'} memory {peak:.2f} GB "
          f"(RSS before: {rss_before:.2f} GB)")
    print("ours:", {k: round(v, 6) for k, v in ours.items()})
    result = {"device": device, "n": args.n, "classes": args.classes, "dim": args.dim,
              "ours_s": round(t_ours, 3), "ours_peak_gb": round(peak, 3), "ours": ours}

    if args.skip_pml:
        print("pytorch-metric-learning comparison skipped (--skip-pml)")
    else:
        try:
            import faiss  # noqa: F401  (AccuracyCalculator's default k-NN)
            from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
        except ImportError as err:
            print(f"pytorch-metric-learning comparison skipped: {err}")
        else:
            calc = AccuracyCalculator(
                include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
                k="max_bin_count",
            )
            t0 = time.perf_counter()
            ref = calc.get_accuracy(x, y, x, y, ref_includes_query=True)
            t_pml = time.perf_counter() - t0
            pairs = [("recall@1", "precision_at_1"), ("map@r", "mean_average_precision_at_r"),
                     ("r_precision", "r_precision")]
            diff = max(abs(ours[a] - ref[b]) for a, b in pairs)
            print(f"pytorch-metric-learning AccuracyCalculator: {t_pml:.2f} s")
            print("pml:", {k: round(v, 6) for k, v in ref.items()})
            print(f"speed-up {t_pml / t_ours:.1f}x, largest metric difference {diff:.2e}")
            result.update(pml_s=round(t_pml, 3), speedup=round(t_pml / t_ours, 2),
                          max_abs_diff=diff, pml=ref)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
