"""Wall time of a full preset on the real dataset sizes, from one bounded run."""

from __future__ import annotations

import statistics

from .layouts import Layout

# METHOD.md §4: official split sizes (train images, test images, test classes).
REAL_SIZES = {
    "sop": {"train_images": 59551, "test_images": 60502, "test_classes": 11316},
    "cub": {"train_images": 5864, "test_images": 5924, "test_classes": 100},
    "cars": {"train_images": 8054, "test_images": 8131, "test_classes": 98},
    "inshop": {"train_images": 25882, "test_images": 14218 + 12612, "test_classes": 3985},
    "inat": {"train_images": 325846, "test_images": 136093, "test_classes": 2452},
}


def validated_epochs(epochs: int, eval_cfg: dict, trainer_cfg: dict) -> int:
    """Epochs the preset validates during fit: with eval.start_epoch / eval.every_n_epochs,
    epoch e (0-based) when e >= start and (e - start) % every == 0, and the final epoch
    always (callbacks/eval_schedule.py); without them Lightning's check_val_every_n_epoch."""
    if "start_epoch" in eval_cfg or "every_n_epochs" in eval_cfg:
        start = int(eval_cfg.get("start_epoch") or 0)
        every = max(int(eval_cfg.get("every_n_epochs") or 1), 1)
        return sum(
            1 for e in range(epochs) if e == epochs - 1 or (e >= start and (e - start) % every == 0)
        )
    every = max(int(trainer_cfg.get("check_val_every_n_epoch") or 1), 1)
    return sum(1 for e in range(epochs) if (e + 1) % every == 0)


def measured(probe: dict, cost: dict) -> dict:
    """One run's measurements for `project`: images/s, training seconds and evaluation
    seconds from the run's own record (metrics.json's `cost`: the val seconds are its mean
    per evaluation), with what only the probe sees (which evaluations ran, their images
    and k-means seconds; the checkpoint writes)."""
    seconds = {
        "before": cost.get("before_eval_s"),
        "val": cost.get("eval_s"),
        "test": cost.get("test_eval_s"),
    }
    return {
        "images_per_s": cost.get("train_images_per_s"),
        "train_loop_s": cost.get("train_s"),
        "batch_size": probe.get("batch_size"),
        "evals": [{**e, "s": seconds.get(e["label"])} for e in probe.get("evals") or []],
        "checkpoints": probe.get("checkpoints") or [],
    }


def project(cfg: dict, probe: dict, layout: Layout, run_wall_s: float) -> dict:
    """Wall time of the full preset on the real dataset, from this run's measurements
    (`measured`)."""
    trainer_cfg, data_cfg = cfg.get("trainer") or {}, cfg.get("data") or {}
    eval_cfg = cfg.get("eval") or {}
    real = REAL_SIZES[layout.dataset]
    epochs = int(trainer_cfg.get("max_epochs") or 1)
    batch = int(data_cfg.get("batch_size") or probe.get("batch_size") or 1)
    ips = probe.get("images_per_s")
    images_per_epoch = real["train_images"] // batch * batch
    train_s = epochs * images_per_epoch / ips if ips else None

    evals = [e for e in probe.get("evals") or [] if e.get("s") is not None]
    plain = [e for e in evals if e["label"] in ("before", "val") and e.get("images")]
    per_image = (
        statistics.median((e["s"] - e.get("clustering_s", 0.0)) / e["images"] for e in plain)
        if plain
        else None
    )
    tests = [e for e in evals if e["label"] == "test" and e.get("images")]
    n_val = validated_epochs(epochs, eval_cfg, trainer_cfg)
    before = 1 if cfg.get("eval_before_training", True) else 0
    eval_s = clustering_real = None
    if per_image is not None:
        one_eval = per_image * real["test_images"]
        test = tests[-1] if tests else {"s": 0.0, "images": 0}
        clustering = test.get("clustering_s", 0.0)
        # what the test adds beyond embedding + retrieval metrics, besides k-means (the
        # dashboard's figures): taken as constant
        rest = max(test["s"] - per_image * test["images"] - clustering, 0.0)
        # k-means: seeding and Lloyd steps grow with items x classes (an upper bound)
        growth = (real["test_images"] * real["test_classes"]) / max(
            layout.test_images * layout.test_classes, 1
        )
        clusterings = 1 + (n_val if eval_cfg.get("clustering_every_epoch") else 0)
        clustering_real = clusterings * clustering * growth
        eval_s = (before + n_val + 1) * one_eval + clustering_real + rest

    lasts = [c["s"] for c in probe.get("checkpoints") or [] if c["file"].startswith("last")]
    bests = [c["s"] for c in probe.get("checkpoints") or [] if not c["file"].startswith("last")]
    ckpt_s = epochs * (statistics.fmean(lasts) if lasts else 0.0) + n_val * (
        statistics.fmean(bests) if bests else 0.0
    )
    accounted = (
        (probe.get("train_loop_s") or 0.0)
        + sum(e["s"] for e in evals)
        + sum(c["s"] for c in probe.get("checkpoints") or [])
    )
    startup_s = max(run_wall_s - accounted, 0.0)
    total = None if train_s is None or eval_s is None else train_s + eval_s + ckpt_s + startup_s
    return {
        "dataset": layout.dataset,
        "epochs": epochs,
        "batch_size": batch,
        "train_images_per_epoch": images_per_epoch,
        "test_images": real["test_images"],
        "validated_epochs": n_val,
        "evaluations": before + n_val + 1,
        "train_h": _hours(train_s),
        "eval_h": _hours(eval_s),
        "kmeans_h": _hours(clustering_real),
        "checkpoint_h": _hours(ckpt_s),
        "startup_h": _hours(startup_s),
        "hours": _hours(total),
        "note": "training at the measured images/s; evaluations scaled by test images, k-means "
        "by test images x classes (an upper bound); a best checkpoint at every validated epoch",
    }


def _hours(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds / 3600, 4)
