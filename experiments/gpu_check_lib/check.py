"""The whole check: smoke phase, layouts, presets, benches; failures and the JSON line."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .benches import benches, describe_bench, sop_vs_bench
from .layouts import write_layouts
from .presets import PRESET_RESERVE_S, describe, run_preset
from .smoke import smoke_phase


class StopAfterSmoke(Exception):
    """The smoke phase failed (or --smoke-only): the measured runs are not started."""


def run_check(args) -> int:
    """The check with gpu_check.py's options (`parse_args`); the exit status (0: passed)."""
    args.steps = args.steps or (4 if args.tiny else 300)
    budget = args.budget_s or (300.0 if args.tiny else 480.0)
    deadline = time.monotonic() + budget
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=args.workdir))
    procs = min(os.cpu_count() or 1, 2) if args.tiny else (os.cpu_count() or 1)
    summary: dict = {"mode": ("cpu" if args.cpu else "gpu") + ("-tiny" if args.tiny else "")}
    failures: list[str] = []
    try:
        if not args.skip_smoke:
            summary["smoke"] = smoke_phase(args, work, procs)
            failures += summary["smoke"]["failures"]
            if failures or args.smoke_only:
                if failures:
                    print("the smoke phase failed: the measured runs are not started", flush=True)
                raise StopAfterSmoke
        t = time.perf_counter()
        layouts = write_layouts(work / "data", args.tiny, procs)
        summary["data"] = {
            k: {
                "train": f"{v.train_classes} classes, {v.train_images} images",
                "test": f"{v.test_classes} classes, {v.test_images} images",
                "size": f"{v.image_size[0]}x{v.image_size[1]}",
            }
            for k, v in layouts.items()
        }
        summary["data_write_s"] = round(time.perf_counter() - t, 1)
        summary["data_write_processes"] = procs
        print(f"wrote the layouts in {summary['data_write_s']} s with {procs} processes: {work}")

        presets = summary["presets"] = {}
        for i, name in enumerate(args.presets):
            dataset = name.split("_")[0]
            if dataset not in layouts:
                failures.append(f"{name}: no fake layout for this preset (only sop*, cub*)")
                continue
            # a hung run leaves the later presets their share of the budget
            later = len(args.presets) - i - 1
            r = run_preset(name, layouts[dataset], work, args, deadline - PRESET_RESERVE_S * later)
            failures += r.pop("failures")
            presets[name] = r
            print(describe(name, r), flush=True)
        summary["bench"] = benches(args, work, deadline)
        for label, b in summary["bench"].items():
            print(describe_bench(label, b), flush=True)
        failures += [b["failure"] for b in summary["bench"].values() if "failure" in b]
        summary["sop_e2e_vs_bench_step"] = sop_vs_bench(presets, summary["bench"])
    except StopAfterSmoke:
        pass
    except Exception as err:  # noqa: BLE001 (a bug here must still end in the JSON line)
        import traceback

        traceback.print_exc()
        failures.append(f"gpu_check.py itself failed: {type(err).__name__}: {err}")
    finally:
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            for log in work.glob("*.log"):
                shutil.copy(log, out / log.name)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    summary["ok"] = not failures
    summary["failures"] = failures
    for f in failures:
        print(f"GPU CHECK FAILED: {f}", file=sys.stderr, flush=True)
        print(f"GPU CHECK FAILED: {f.splitlines()[0]}", flush=True)
    for r in (summary.get("presets") or {}).values():
        for w in r.get("warnings") or []:
            print(f"GPU CHECK WARNING: {w}", flush=True)
    if not failures:
        print("GPU CHECK PASSED", flush=True)
    line = json.dumps(summary, default=str)
    if args.out:
        (Path(args.out) / "gpu_check.json").write_text(line + "\n")
    print(line, flush=True)
    return 1 if failures else 0
