"""Trainable / total parameter counts per component (prompts, BitFit, heads, ...).

Two kinds of trainable parameters: inference-time ones (prompts, BitFit biases, head,
adapters, LoRA: they are the exported model) and training-only ones (the semantic
branch's GRU, proxy head and class prompts, and the proxy bias B: dropped at export).
Each is reported against the backbone's size, the paper's "tuned %".
"""

from __future__ import annotations

import torch.nn as nn

# the image branch (the inference model, what vpt_dml.export ships) lives under this prefix
IMAGE_BRANCH = "embedder."

# (name prefix, component), first match wins
_PREFIXES = (
    ("embedder.backbone.prompts.", "prompts"),
    ("proxies.class_prompts.", "class_prompts"),
    ("embedder.head.", "head"),
    ("proxies.head.", "proxy_head"),
    ("proxies.cell.", "gru"),
    ("proxies.bias", "proxies"),
    ("criterion.", "loss"),  # a loss's own parameters (losses/pml.py: ArcFace's W, ...)
)


# components that exist only to train (vpt_dml.export leaves them out)
TRAINING_ONLY = ("gru", "proxy_head", "class_prompts", "proxies", "loss")
BACKBONE = ("backbone_weight", "backbone_bias")
# rows of parameter_breakdown() that sum components rather than name one
SUMMARY_ROWS = ("inference", "training_only", "all")


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
    backbone_total = sum(rows.get(c, {}).get("total", 0) for c in BACKBONE)

    def summed(components) -> dict:
        trainable = sum(rows[c]["trainable"] for c in components)
        return {
            "trainable": trainable,
            "total": sum(rows[c]["total"] for c in components),
            # the paper's "tuned %" is relative to the backbone's size
            "tuned_pct": 100.0 * trainable / max(backbone_total, 1),
        }

    components = list(rows)
    rows["inference"] = summed([c for c in components if c not in TRAINING_ONLY])
    rows["training_only"] = summed([c for c in components if c in TRAINING_ONLY])
    rows["all"] = summed(components)
    return rows


def tuned_line(rows: dict[str, dict]) -> str:
    """One line: inference-time and training-only trainable parameters, each as % of the backbone."""
    inf, train = rows["inference"], rows["training_only"]
    line = f"tuned: {inf['trainable']:,} inference-time ({inf['tuned_pct']:.2f}% of the backbone)"
    if train["trainable"]:
        names = ", ".join(c for c in TRAINING_ONLY if rows.get(c, {}).get("trainable"))
        line += (
            f" + {train['trainable']:,} training-only ({train['tuned_pct']:.2f}%: {names}; "
            "not in the exported model)"
        )
    return line


def format_breakdown(rows: dict[str, dict]) -> str:
    """A plain-text table of parameter_breakdown(), one component a line, then tuned_line()."""
    lines = [f"{'component':<16}{'trainable':>14}{'total':>14}"]
    for comp, row in rows.items():
        if comp not in SUMMARY_ROWS:
            lines.append(f"{comp:<16}{row['trainable']:>14,}{row['total']:>14,}")
    a = rows["all"]
    lines.append(f"{'all':<16}{a['trainable']:>14,}{a['total']:>14,}")
    lines.append(tuned_line(rows))
    return "\n".join(lines)
