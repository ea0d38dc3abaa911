"""Which runs are one configuration: the same resolved config, seed and paths aside.

The key is config_resolved.yaml (what the run actually used) without `seed`, `hydra`,
`paths`, `ckpt_path`, the keys that interpolate the seed or a path (e.g. `data.seed:
${seed}`, read from the unresolved .hydra/config.yaml) and any value inside the run's own
output folder (checkpoint and logger folders), plus the resolved dataset folder
(`data_location`: `paths.data_dir=A,B` are two groups), so `x=false` and `x=False`, or an override and the same value set by a
preset, are one configuration, and copies of one run in two folders are one run. A run
without config_resolved.yaml (an older one) falls back on its overrides, values parsed
by Hydra's override grammar (`False` == `false`).
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


def parse_overrides(items: list[str]) -> dict[str, object]:
    """{key: value} of recorded command-line overrides, parsed by Hydra's own override
    grammar (YAML misreads Hydra's dicts: `{img_size:32}` is one null-valued key there);
    an item Hydra cannot parse falls back on `key=value` read as YAML. Deletions are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    out: dict[str, object] = {}
    for item in items:
        try:
            (o,) = parser.parse_overrides([item])
        except HydraException:
            key, sep, value = item.partition("=")
            if sep:
                out[key.lstrip("+~")] = normalized(value)
            continue
        if o.is_delete() or o.is_sweep_override():
            continue
        key = o.key_or_group + (f"@{o.package}" if o.package else "")
        out[key] = o.value()
    return out


def shown(value) -> str:
    """The canonical text of a parsed override value, for the table."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


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


def config_key(run_dir: Path, overrides: dict[str, object]) -> tuple:
    flat = resolved(run_dir)
    if flat is None:
        return ("overrides",) + tuple(
            sorted(
                (k, json.dumps(v, default=str)) for k, v in overrides.items() if k not in DROPPED
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


def data_location(result: dict) -> str | None:
    """The dataset folder a run read, as resolved when it ran (protocol.data_root), else
    as recorded (older runs). `paths` is left out of the config key, but two datasets at
    two places are two groups even when their file names and split hash agree."""
    recorded = (result.get("protocol") or {}).get("data_root")
    return recorded or ((result.get("provenance") or {}).get("dataset") or {}).get("root")


def seed_of(run_dir: Path, provenance: dict):
    flat = resolved(run_dir)
    if flat is not None and "seed" in flat:
        return flat["seed"]
    return provenance.get("seed")
