"""Prompt depth: how many layers get prompts, checked against the backbone's depth.

`depth: all` prompts every layer; a number deeper than the backbone is an error rather
than a silent cut (two sweep points would otherwise be the same run).
"""

from __future__ import annotations

from collections.abc import Mapping

from vpt_dml.errors import UserError
from vpt_dml.models.prompted_vit import layer_counts

ALL = "all"


def resolve_depth(depth, num_layers: int, key: str) -> int:
    """`depth` as a layer count in [0, num_layers]; `key` names the setting in errors."""
    if isinstance(depth, str) and depth.strip().lower() == ALL:
        return num_layers
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise UserError(
            f"{key}={depth!r} is not a layer count; use a number from 0 to {num_layers} or {ALL}"
        )
    if depth < 0:
        raise UserError(f"{key}={depth} is negative; use a number from 0 to {num_layers} or {ALL}")
    if depth > num_layers:
        raise UserError(
            f"{key}={depth} is deeper than the backbone's {num_layers} layers; "
            f"set it to at most {num_layers}, or to {ALL} for every layer"
        )
    return depth


def prompt_counts(spec: Mapping | None, num_layers: int, key: str) -> list[int]:
    """Per-layer prompt counts of a `{num, depth, step}` node (METHOD.md §1), depth checked.

    `key` is the node's config path, e.g. "model.peft.prompts"."""
    spec = spec or {}
    num = spec.get("num", 0)
    depth = spec.get("depth", 0)
    if not num:  # no prompts: the depth means nothing, whatever the preset says
        return [0] * num_layers
    depth = resolve_depth(depth, num_layers, f"{key}.depth")
    return layer_counts(num, depth, spec.get("step", 0), num_layers)
