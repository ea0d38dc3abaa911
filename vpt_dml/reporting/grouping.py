"""Which runs are one configuration: the same resolved config, seed and paths aside.

The key is config_resolved.yaml (what the run actually used) without `seed`, `hydra`,
`paths`, `ckpt_path`, the keys that interpolate the seed or a path (e.g. `data.seed:
${seed}`, read from the unresolved .hydra/config.yaml) and any value inside the run's own
output folder (checkpoint and logger folders), so `x=false` and `x=False`, or an override and the same value set by a
preset, are one configuration, and copies of one run in two folders are one run. A run
without config_resolved.yaml (an older one) falls back on its overrides, values parsed
as YAML (`False` == `false`).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

DROPPED = ("seed", "hydra", "paths", "ckpt_path")


def normalized(value: str):
    """An override's value as YAML reads it (so `False`, `false` and `no` agree)."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def shown(value: str) -> str:
    """The canonical text of an override value, for the table."""
    v = normalized(value)
    return v if isinstance(v, str) else json.dumps(v)


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def resolved(run_dir: Path) -> dict | None:
    """config_resolved.yaml as flat {dotted key: value}, or None."""
    try:
        cfg = yaml.safe_load((run_dir / "config_resolved.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return _flatten(cfg) if isinstance(cfg, dict) else None


FOLLOWS = ("${seed}", "${paths.", "${hydra:")
FOLLOWS_SEED_FALLBACK = ("data.seed",)  # conf/data/base.yaml: seed: ${seed}


def following(run_dir: Path) -> set[str]:
    """Keys whose value is an interpolation of the seed, a path or Hydra's runtime
    (from the unresolved .hydra/config.yaml): they vary with the seed or the folder."""
    try:
        raw = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return set(FOLLOWS_SEED_FALLBACK)
    flat = _flatten(raw) if isinstance(raw, dict) else {}
    return {k for k, v in flat.items() if isinstance(v, str) and any(f in v for f in FOLLOWS)}


def config_key(run_dir: Path, overrides: dict[str, str]) -> tuple:
    flat = resolved(run_dir)
    if flat is None:
        return ("overrides",) + tuple(
            sorted(
                (k, json.dumps(normalized(v), default=str))
                for k, v in overrides.items()
                if k not in DROPPED
            )  # fmt: skip
        )
    out_dir = str(flat.get("paths.output_dir") or run_dir)
    derived = following(run_dir)
    kept = {
        k: v
        for k, v in flat.items()
        if k.split(".")[0] not in DROPPED
        and k not in derived
        and not (isinstance(v, str) and (v == out_dir or v.startswith(out_dir.rstrip("/") + "/")))
    }
    return ("resolved",) + tuple(sorted((k, json.dumps(v, default=str)) for k, v in kept.items()))


def seed_of(run_dir: Path, provenance: dict):
    flat = resolved(run_dir)
    if flat is not None and "seed" in flat:
        return flat["seed"]
    return provenance.get("seed")
