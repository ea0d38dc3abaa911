"""The measured runs: a preset for a bounded number of steps, what it reports, described."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from .checks import check_csv, check_losses, check_metrics_json
from .layouts import Layout
from .processes import REPO, SCRIPT, run_logged, tail
from .projection import measured, project

PRESETS = ("sop_deep", "cub_deep")
PRESET_RESERVE_S = 100  # budget kept for each preset still to run

# The tiny ViT of tests/conftest.py, 12 blocks deep so the presets' prompt depths stay valid.
_TINY_BACKBONE = [
    "model.backbone.name=vit_tiny_patch16_224",
    "model.backbone.pretrained=false",
    "model.backbone.weights=null",
    "++model.backbone.synthetic_pretraining=null",
    "++model.backbone.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 12, num_heads: 2}",
    "model.embed_dim=16",
]


def tiny_backbone() -> list[str]:
    return list(_TINY_BACKBONE)


def preset_batch_size(overrides: list[str]) -> int:
    """data.batch_size of the run as Hydra composes it (to size the bounded run)."""
    try:
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[o for o in overrides if not o.startswith("hydra.")])
        GlobalHydra.instance().clear()
        return int(cfg.data.batch_size)
    except Exception as err:  # noqa: BLE001 (the run itself will report a bad config)
        print(f"could not compose the config ({type(err).__name__}: {err}); batch size from yaml")
    return _yaml_batch_size(overrides)


def _yaml_batch_size(overrides: list[str]) -> int:
    """Fallback: the experiment's data.batch_size, else its data option's batch_size."""
    import yaml

    name = next(o.split("=", 1)[1] for o in overrides if o.startswith("+experiment="))
    node = yaml.safe_load((REPO / "conf" / "experiment" / f"{name}.yaml").read_text()) or {}
    if (node.get("data") or {}).get("batch_size"):
        return int(node["data"]["batch_size"])
    for entry in node.get("defaults") or []:
        if isinstance(entry, dict) and "override /data" in entry:
            data = REPO / "conf" / "data" / f"{entry['override /data']}.yaml"
            return int((yaml.safe_load(data.read_text()) or {}).get("batch_size") or 32)
    return 32


def run_preset(name: str, layout: Layout, work: Path, args, deadline: float) -> dict:
    overrides = [
        f"+experiment={name}",
        f"data.root={layout.root}",
        "data.strict_counts=false",
        "model.backbone.pretrained=false",
        "model.backbone.weights=null",
        f"hydra.run.dir={work / 'runs' / name}",
        "trainer.enable_progress_bar=false",
    ]
    settings = (tiny_backbone() + ["data.num_workers=1"]) if args.tiny else []
    if args.cpu:
        settings += ["trainer.accelerator=cpu", "trainer.precision=32-true"]
    settings += args.override
    batch = preset_batch_size(overrides + settings)
    epoch_len = max(layout.train_images // batch, 1)
    if args.steps <= epoch_len:  # stop inside the first epoch, at an epoch end
        steps = args.steps
        overrides += [f"trainer.limit_train_batches={steps}", f"trainer.max_steps={steps}"]
    else:  # whole epochs
        steps = math.ceil(args.steps / epoch_len) * epoch_len
        overrides.append(f"trainer.max_steps={steps}")
    overrides += settings
    warmup = args.warmup if args.warmup is not None else max(1, min(30, steps // 10))
    # the run's own record (metrics.json's cost) times images/s after the same warm-up
    overrides.append(f"callbacks.cost.warmup_steps={warmup}")
    run_dir = work / "runs" / name
    probe_path = work / f"{name}_probe.json"
    log_path = work / f"{name}.log"
    cmd = [sys.executable, str(SCRIPT), "--launch-run", str(probe_path)]
    cmd += [str(warmup), *overrides]
    out = {"overrides": overrides, "steps": steps, "warmup": warmup, "failures": []}
    print(f"[{name}] {steps} steps (batch {batch}), warm-up {warmup}: {' '.join(overrides)}")
    t = time.perf_counter()
    rc = run_logged(cmd, log_path, args.cpu, deadline - time.monotonic())
    out["run_wall_s"] = round(time.perf_counter() - t, 2)
    out["rc"] = rc
    out["log"] = str(log_path)
    if rc != 0:
        last = tail(log_path).strip().splitlines()
        out["failures"].append(
            f"{name}: vpt_dml.run exited with {rc}: {last[-1] if last else '(no output)'}\n"
            f"last lines of {log_path}:\n{tail(log_path)}"
        )

    probe = json.loads(probe_path.read_text()) if probe_path.is_file() else None
    if probe is None:
        out["failures"].append(
            f"{name}: the run recorded no measurements (crashed before training)"
        )
    else:
        out["failures"] += [f"{name}: {p}" for p in check_losses(probe["losses"])]
        warnings = []
        if not any(e["label"] == "before" for e in probe["evals"]):
            warnings.append(f"{name}: no evaluation before training ran")
        if rc == 0 and probe["steps"] != steps:
            warnings.append(f"{name}: {probe['steps']} training steps ran, {steps} were asked for")
        if warnings:
            out["warnings"] = warnings
    metrics_path = run_dir / "metrics.json"
    result = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    if result is None:
        if rc == 0:
            out["failures"].append(f"{name}: {metrics_path} is missing")
    else:
        out["failures"] += [f"{name}: {p}" for p in check_metrics_json(result)]
        out["metrics"] = result.get("metrics")
        for key in ("final", "best", "before", "cost"):
            if key in result:
                out[key] = result[key]
    if rc == 0:
        out["failures"] += [f"{name}: {p}" for p in check_csv(run_dir / "csv" / "metrics.csv")]

    cfg_path = run_dir / "config_resolved.yaml"
    if probe is not None and cfg_path.is_file():
        import yaml

        cfg = yaml.safe_load(cfg_path.read_text())
        model = cfg.get("model") or {}
        out["as_run"] = {
            "precision": (cfg.get("trainer") or {}).get("precision"),
            "batch_size": (cfg.get("data") or {}).get("batch_size"),
            "samples_per_class": (cfg.get("data") or {}).get("samples_per_class"),
            "num_workers": (cfg.get("data") or {}).get("num_workers"),
            "fast_decode": (cfg.get("data") or {}).get("fast_decode"),
            "class_prompt_store": (model.get("proxy") or {}).get("class_prompt_store"),
            "eval": cfg.get("eval"),
            "max_epochs": (cfg.get("trainer") or {}).get("max_epochs"),
        }
    cost = (result or {}).get("cost") or {}
    seen = measured(probe, cost) if probe is not None else None
    if seen is not None and "as_run" in out:
        out["projection"] = project(cfg, seen, layout, out["run_wall_s"])
    if probe is not None:
        losses = probe["losses"]
        out.update(
            device=probe["device"],
            train_images_per_s=_round(cost.get("train_images_per_s"), 1),
            timed_steps=probe["steps"] - probe["warmup"],
            gap_ms_median=probe["gap_ms_median"],
            loss_first=losses[0] if losses else None,
            loss_last=losses[-1] if losses else None,
            loss_finite=not check_losses(losses),
            gpu_util=probe["gpu_util"],
            peak_memory_mib=_round(cost.get("peak_memory_mib"), 1),
            peak_memory_kind=cost.get("peak_memory_kind"),
            evals=seen["evals"],
            checkpoints=probe["checkpoints"],
            bank=probe["bank"],
        )
    return out


def _round(x, n):
    return None if x is None else round(x, n)


def _seconds(s) -> str:
    return "? s" if s is None else f"{s:.1f} s"


def describe(name: str, r: dict) -> str:
    util = r.get("gpu_util") or {}
    ev = ", ".join(
        f"{e['label']} {_seconds(e.get('s'))} ({e.get('images')} images)"
        for e in r.get("evals") or []
    )
    bank = r.get("bank")
    if bank:
        host = sum(v for v in bank["host"].values())
        bank_s = (
            f"bank copies H2D {bank.get('h2d_ms_per_step', '-')} ms/step "
            f"({bank.get('h2d_mib_per_step', '-')} MiB), D2H {bank.get('d2h_ms_per_step', '-')} "
            f"ms/step, host time in the bank {host:.2f} ms/step"
        )
    else:
        bank_s = "no host bank"
    ck = sum(c["s"] for c in r.get("checkpoints") or [])
    p = r.get("projection") or {}
    lines = [
        f"[{name}] {r.get('device')}: {r.get('train_images_per_s')} training images/s over "
        f"{r.get('timed_steps')} steps after {r.get('warmup')} warm-up; host gap between "
        f"steps {r.get('gap_ms_median')} ms (median)",
        f"[{name}] GPU utilisation {util.get('median_pct')}% median / {util.get('mean_pct')}% mean "
        f"({util.get('samples')} samples, {util.get('source') or util.get('unavailable')}); peak "
        f"memory {r.get('peak_memory_mib')} MiB ({r.get('peak_memory_kind')}, metrics.json)",
        f"[{name}] evaluations: {ev or 'none'}; checkpoints {ck:.1f} s; {bank_s}",
        f"[{name}] loss {r.get('loss_first')} -> {r.get('loss_last')}; metrics {r.get('metrics')}",
        f"[{name}] projected full preset on real {p.get('dataset')}: {p.get('epochs')} epochs x "
        f"{p.get('train_images_per_epoch')} images = {p.get('train_h')} h training + "
        f"{p.get('evaluations')} evaluations {p.get('eval_h')} h + checkpoints "
        f"{p.get('checkpoint_h')} h + start-up {p.get('startup_h')} h = {p.get('hours')} h",
    ]
    return "\n".join(lines)
