"""What a method is, and what a built model actually trains.

`PEFT_METHODS` defines each `model.peft.name` by what it trains in the backbone (the
embedding head always trains). The same definitions serve two readers: the config check
(vpt_dml/runs/config_schema.py: a name whose switches say otherwise is refused) and
`effective_method`, which reads the *built* model (prompt tokens, requires_grad, adapter
and LoRA parameters, proxy class) and names the method it matches. metrics.json records
the latter, so a result is labelled with what trained, not with what the config said.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn as nn

from vpt_dml.models.params import component_of, parameter_breakdown
from vpt_dml.models.prompted_vit import layer_counts

SWITCHES = ("bitfit", "full", "adapter", "lora")


def _method(prompts: tuple[str, ...] = ("none",), **on: bool) -> dict:
    """prompts: which layers may hold shared prompt tokens: none, shallow (layer 0 only),
    deep (more layers); the switches not named are off."""
    return {"prompts": set(prompts), **{k: bool(on.get(k)) for k in SWITCHES}}


PEFT_METHODS: dict[str, dict] = {
    "linear": _method(),
    "bitfit": _method(bitfit=True),
    "vpt_shallow": _method(("shallow",)),
    "vpt_deep": _method(("deep",)),
    "vptsp": _method(("shallow", "deep"), bitfit=True),
    "adapter": _method(adapter=True),
    "lora": _method(lora=True),
    "full": _method(full=True),
}
# a deliberate mix of switches (e.g. adapter + BitFit): no definition to match
CUSTOM = "custom"
ALL_LAYERS = 64  # `depth: all` when no backbone is at hand: deeper than any ViT


def prompt_depth_kind(counts: Sequence[int]) -> str:
    layers = sum(1 for n in counts if n > 0)
    return "none" if layers == 0 else "shallow" if layers == 1 and counts[0] > 0 else "deep"


def features_from_config(peft: Mapping) -> dict:
    """The features of a `model.peft` node, as PEFT_METHODS spells them."""
    p = peft.get("prompts") or {}
    depth = p.get("depth") or 0
    depth = (
        ALL_LAYERS if str(depth).lower() == "all" else int(depth)
    )  # only deep vs shallow matters
    counts = layer_counts(int(p.get("num") or 0), depth, int(p.get("step") or 0), depth)
    full = bool(peft.get("full", False))
    return {
        "prompts": prompt_depth_kind(counts),
        # with full fine-tuning every bias trains anyway: BitFit is not a separate part
        "bitfit": bool(peft.get("bitfit", False)) and not full,
        "full": full,
        "adapter": bool((peft.get("adapter") or {}).get("enabled", False)),
        "lora": bool((peft.get("lora") or {}).get("enabled", False)),
    }


def matches(features: Mapping, method: str) -> bool:
    sig = PEFT_METHODS[method]
    return features["prompts"] in sig["prompts"] and all(features[k] == sig[k] for k in SWITCHES)


def peft_method_of(features: Mapping) -> str:
    """The PEFT_METHODS name whose definition these features meet, else CUSTOM."""
    return next((m for m in PEFT_METHODS if matches(features, m)), CUSTOM)


SWITCH_WORDS = {
    "bitfit": "BitFit",
    "full": "all backbone weights",
    "adapter": "adapters",
    "lora": "LoRA",
}
PROMPT_WORDS = {"shallow": "layer-0 prompts", "deep": "deep prompts"}


def describe(features: Mapping) -> str:
    """Words for a feature set or a PEFT_METHODS definition, e.g. 'deep prompts + BitFit'."""
    prompts = features["prompts"]
    kinds = ({prompts} if isinstance(prompts, str) else set(prompts)) - {"none"}
    parts = ["prompts"] if len(kinds) > 1 else [PROMPT_WORDS[k] for k in kinds]
    parts += [SWITCH_WORDS[k] for k in SWITCHES if features[k]]
    return " + ".join(parts) or "the head only"


def _backbone_features(module: nn.Module) -> dict:
    """Which backbone parameters train: biases only (BitFit), every weight (full), and
    whether adapter / LoRA parameters exist (they always train). Names are sorted into
    components by models/params.py, the one place that knows the prefixes."""
    seen = {"adapters": False, "lora": False}
    total = {"backbone_bias": 0, "backbone_weight": 0}
    trainable = dict(total)
    for name, p in module.named_parameters():
        comp = component_of(name)
        if comp in seen:
            seen[comp] = True
        elif comp in total:
            total[comp] += 1
            trainable[comp] += int(p.requires_grad)
    weights, biases = trainable["backbone_weight"], trainable["backbone_bias"]
    full = total["backbone_weight"] > 0 and weights == total["backbone_weight"]
    bitfit = not full and weights == 0 and biases == total["backbone_bias"] > 0
    return {
        "bitfit": bitfit,
        "full": full,
        "adapter": seen["adapters"],
        "lora": seen["lora"],
        "partial": not full and not bitfit and weights + biases > 0,
    }


def _proxy_summary(proxies: nn.Module) -> dict:
    # duck-typed: semantic proxies carry class prompts and an update kind
    update = getattr(proxies, "update", None)
    prompts = getattr(proxies, "class_prompts", None)
    if prompts is None:
        return {"kind": "learned" if hasattr(proxies, "bias") else type(proxies).__name__}
    return {
        "kind": "semantic_mix" if update == "mix" else "semantic_gru",
        "update": update,
        "class_prompt_tokens_per_layer": list(prompts.counts),
        "class_prompt_store": "host" if getattr(prompts, "store", None) is not None else "device",
    }


def effective_method(module: nn.Module) -> dict:
    """What trains in a built VPTDMLModule, read off the model (not the config).

    {"peft": name from PEFT_METHODS or "custom", "prompt_tokens_per_layer": [...],
     "bitfit", "full", "adapter", "lora", "partial_backbone": bools,
     "proxy": {"kind", "update", "class_prompt_tokens_per_layer", "class_prompt_store"},
     "trainable_parameters": n (host class-prompt bank included), "label": "peft / proxy"}
    """
    backbone = module.embedder.backbone
    counts = list(backbone.prompts.counts)
    bb = _backbone_features(module)
    features = {"prompts": prompt_depth_kind(counts), **{k: bb[k] for k in SWITCHES}}
    peft = CUSTOM if bb["partial"] else peft_method_of(features)
    proxy = _proxy_summary(module.proxies)
    extra_fn = getattr(module.proxies, "external_parameter_counts", None)
    trainable = parameter_breakdown(module, extra_fn() if extra_fn else None)["all"]["trainable"]
    label = proxy["kind"] + (
        f" ({proxy['update']})" if proxy.get("update") not in (None, "mix") else ""
    )
    return {
        "peft": peft,
        "prompt_tokens_per_layer": counts,
        **{k: bb[k] for k in SWITCHES},
        "partial_backbone": bb["partial"],
        "proxy": proxy,
        "trainable_parameters": int(trainable),
        "label": f"{peft} / {label}",
    }
