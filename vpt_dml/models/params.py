"""Trainable / total parameter counts per component (prompts, BitFit, heads, ...)."""

from __future__ import annotations

import torch.nn as nn

# (name prefix, component), first match wins
_PREFIXES = (
    ("embedder.backbone.prompts.", "prompts"),
    ("proxies.class_prompts.", "class_prompts"),
    ("embedder.head.", "head"),
    ("proxies.head.", "proxy_head"),
    ("proxies.cell.", "gru"),
    ("proxies.bias", "proxies"),
)


def component_of(name: str) -> str:
    """Map a parameter name of VPTDMLModule to the component it belongs to."""
    for prefix, component in _PREFIXES:
        if name.startswith(prefix):
            return component
    if ".adapter" in name:
        return "adapters"
    if ".lora_" in name:
        return "lora"
    if name.startswith("embedder.backbone.vit."):
        return "backbone_bias" if name.endswith("bias") else "backbone_weight"
    return "other"


def is_proxy_bias(name: str) -> bool:
    """The proxy bias B (or the learned proxies): trained at optim.lr_proxy."""
    return component_of(name) == "proxies"


def parameter_breakdown(
    module: nn.Module, extra: dict[str, tuple[int, int]] | None = None
) -> dict[str, dict]:
    """{component: {"trainable": n, "total": n}} plus an "all" row with "tuned_pct".

    `extra` adds parameters that live outside the module (e.g. a host-side prompt store).
    """
    rows: dict[str, dict] = {}
    for name, p in module.named_parameters():
        row = rows.setdefault(component_of(name), {"trainable": 0, "total": 0})
        row["total"] += p.numel()
        row["trainable"] += p.numel() if p.requires_grad else 0
    for comp, (trainable, total) in (extra or {}).items():
        row = rows.setdefault(comp, {"trainable": 0, "total": 0})
        row["trainable"] += trainable
        row["total"] += total
    trainable = sum(r["trainable"] for r in rows.values())
    total = sum(r["total"] for r in rows.values())
    backbone_total = rows.get("backbone_weight", {}).get("total", 0) + rows.get(
        "backbone_bias", {}
    ).get("total", 0)
    rows["all"] = {
        "trainable": trainable,
        "total": total,
        # the paper's "tuned %" is relative to the backbone's size
        "tuned_pct": 100.0 * trainable / max(backbone_total, 1),
    }
    return rows


def format_breakdown(rows: dict[str, dict]) -> str:
    """A plain-text table of parameter_breakdown(), one component a line."""
    lines = [f"{'component':<16}{'trainable':>14}{'total':>14}"]
    for comp, row in rows.items():
        if comp != "all":
            lines.append(f"{comp:<16}{row['trainable']:>14,}{row['total']:>14,}")
    a = rows["all"]
    lines.append(
        f"{'all':<16}{a['trainable']:>14,}{a['total']:>14,}  ({a['tuned_pct']:.2f}% tuned)"
    )
    return "\n".join(lines)
