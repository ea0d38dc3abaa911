"""The smoke phase: every CUDA path a few steps each, before any measured run."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .checks import check_csv, check_metrics_json
from .layouts import Layout, write_smoke_layouts
from .presets import tiny_backbone
from .processes import run_logged, tail

SMOKE_IMAGES = 50  # images embedded and searched by export -> embed -> retrieve
SMOKE_TOP_K = 5


def smoke_overrides(name: str, layout: Layout, run_dir: Path, args) -> list[str]:
    out = [
        f"+experiment={name}",
        f"data.root={layout.root}",
        "data.strict_counts=false",
        "model.backbone.pretrained=false",
        "model.backbone.weights=null",
        f"hydra.run.dir={run_dir}",
        "trainer.enable_progress_bar=false",
        f"trainer.limit_train_batches={2 if args.tiny else 10}",
        "trainer.max_epochs=2",
    ]
    if args.tiny:
        out += tiny_backbone() + ["data.num_workers=1"]
    if args.cpu:
        out += ["trainer.accelerator=cpu", "trainer.precision=32-true"]
    return out + list(args.override)


def smoke_step(label: str, cmd: list[str], work: Path, args, deadline: float) -> tuple[dict, list]:
    """One command of the smoke phase, logged to work/smoke_<label>.log."""
    log_path = work / f"smoke_{label}.log"
    t = time.perf_counter()
    rc = run_logged(cmd, log_path, args.cpu, deadline - time.monotonic())
    step = {"rc": rc, "wall_s": round(time.perf_counter() - t, 1), "log": str(log_path)}
    failures = []
    if rc != 0:
        last = tail(log_path).strip().splitlines()
        failures.append(
            f"smoke {label}: exited with {rc}: {last[-1] if last else '(no output)'}\n"
            f"last lines of {log_path}:\n{tail(log_path)}"
        )
    return step, failures


def check_smoke_run(label: str, run_dir: Path, epochs: int) -> tuple[dict, list[str]]:
    """metrics.json finished, metrics in [0, 1], finite losses, the last epoch evaluated."""
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        return {}, [f"smoke {label}: {metrics_path} is missing"]
    result = json.loads(metrics_path.read_text())
    problems = [f"smoke {label}: {p}" for p in check_metrics_json(result)]
    problems += [f"smoke {label}: {p}" for p in check_csv(run_dir / "csv" / "metrics.csv")]
    if result.get("status") != "finished":
        problems.append(f"smoke {label}: metrics.json status is {result.get('status')!r}")
    final = result.get("final") or {}
    if final.get("epoch") != epochs - 1:
        problems.append(
            f"smoke {label}: the final evaluation is of epoch {final.get('epoch')}, "
            f"expected {epochs - 1}"
        )
    seen = {
        "status": result.get("status"),
        "final_epoch": final.get("epoch"),
        "recall@1": (result.get("metrics") or {}).get("recall@1"),
        "recall@1_before": (result.get("metrics") or {}).get("recall@1_before"),
        "warnings": result.get("warnings") or [],
    }
    return seen, problems


def smoke_serving(name: str, layout: Layout, run_dir: Path, work: Path, args, deadline) -> tuple:
    """export -> embed SMOKE_IMAGES test images -> retrieve them: each query's own image
    comes back first with cosine ~1 (it is in the gallery)."""
    from vpt_dml.data.registry import load_splits

    splits, _ = load_splits(layout.dataset, str(layout.root))
    images = work / f"smoke_{name}_images"
    images.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(splits.test.paths[:SMOKE_IMAGES]):
        link = images / f"{i:03d}{Path(path).suffix}"
        if not link.exists():
            link.symlink_to(path)
    py, steps, failures = sys.executable, {}, []
    weights = work / f"smoke_{name}.safetensors"
    emb = work / f"smoke_{name}_embed"
    found = work / f"smoke_{name}_retrieval.json"
    device = ["--device", "cpu" if args.cpu else "cuda"]
    plan = [
        ("export", [py, "-m", "vpt_dml.export", str(run_dir), str(weights)]),
        ("embed", [py, "-m", "vpt_dml.embed", str(weights), str(images), str(emb), *device]),
        (
            "retrieve",
            [py, "-m", "vpt_dml.retrieve", str(weights), str(images), str(emb)]
            + ["--top-k", str(SMOKE_TOP_K), "--out", str(found), *device],
        ),
    ]
    for label, cmd in plan:
        steps[label], problems = smoke_step(f"{name}_{label}", cmd, work, args, deadline)
        failures += problems
        if problems:
            return steps, failures
    meta = json.loads((emb / "embed.json").read_text())
    if meta.get("count") != SMOKE_IMAGES:
        failures.append(f"smoke {name} embed: {meta.get('count')} embeddings, not {SMOKE_IMAGES}")
    failures += [f"smoke {name} retrieve: {p}" for p in check_self_retrieval(found)]
    return steps, failures


def check_self_retrieval(path: Path) -> list[str]:
    """Every query's first neighbour is its own file, with cosine >= 0.999."""
    rows = json.loads(path.read_text())
    queries = rows if isinstance(rows, list) else rows.get("queries") or []
    if len(queries) != SMOKE_IMAGES:
        return [f"{len(queries)} queries answered, not {SMOKE_IMAGES}"]
    problems = []
    for q in queries:
        hits = q.get("neighbours") or q.get("results") or []
        if len(hits) != SMOKE_TOP_K:
            problems.append(f"{q.get('query')}: {len(hits)} neighbours, not {SMOKE_TOP_K}")
            continue
        first = hits[0]
        same = Path(str(first.get("path"))).name == Path(str(q.get("query"))).name
        score = first.get("similarity", first.get("score", 0.0))
        if not same or float(score) < 0.999:
            problems.append(f"{q.get('query')}: first neighbour {first}, not itself")
    return problems[:5]


def smoke_phase(args, work: Path, procs: int) -> dict:
    """sop_deep and cub_deep: evaluation before, 2 short epochs, test; a resume to a third
    epoch from last.ckpt; export, embed and retrieve of SMOKE_IMAGES images. Every CUDA path
    the measured runs take (the presets' precision, host bank, workers, device evaluation
    and k-means, fused AdamW, checkpoints) runs here first, in about two minutes."""
    deadline = time.monotonic() + (args.smoke_budget_s or (600.0 if args.tiny else 150.0))
    out: dict = {"presets": {}, "failures": []}
    t = time.perf_counter()
    layouts = write_smoke_layouts(work / "smoke_data", args.tiny, procs)
    out["data_write_s"] = round(time.perf_counter() - t, 1)
    py = sys.executable
    for name in args.presets:
        layout = layouts.get(name.split("_")[0])
        if layout is None:
            out["failures"].append(f"smoke {name}: no fake layout for this preset")
            continue
        run_dir = work / "smoke_runs" / name
        base = smoke_overrides(name, layout, run_dir, args)
        r: dict = {"steps": {}}
        cmd = [py, "-m", "vpt_dml.run", *base]
        r["steps"]["train"], failures = smoke_step(f"{name}_train", cmd, work, args, deadline)
        if not failures:
            r["train"], failures = check_smoke_run(f"{name} train", run_dir, 2)
        if not failures:
            ckpt = run_dir / "checkpoints" / "last.ckpt"
            # a resume may change the epoch count, nothing else (vpt_dml.run refuses more)
            resume = [o for o in base if not o.startswith("trainer.max_epochs=")]
            cmd = [py, "-m", "vpt_dml.run", *resume, "trainer.max_epochs=3", f"ckpt_path={ckpt}"]
            r["steps"]["resume"], failures = smoke_step(f"{name}_resume", cmd, work, args, deadline)
            if not failures:
                r["resume"], failures = check_smoke_run(f"{name} resume", run_dir, 3)
        if not failures:
            serving, failures = smoke_serving(name, layout, run_dir, work, args, deadline)
            r["steps"].update(serving)
        out["failures"] += failures
        out["presets"][name] = r
        print(
            f"[smoke {name}] "
            + ", ".join(f"{k} rc={v['rc']} {v['wall_s']} s" for k, v in r["steps"].items())
            + (" FAILED" if failures else " ok"),
            flush=True,
        )
    out["wall_s"] = round(time.perf_counter() - t, 1)
    return out
