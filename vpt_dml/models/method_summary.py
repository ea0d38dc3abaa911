"""What a method is, and what a built model actually trains.

`PEFT_METHODS` defines each `model.peft.name` by what it trains in the backbone (the
embedding head always trains). The same definitions serve two readers: the config check
(vpt_dml/config_checks.py: a name whose switches say otherwise is refused) and
`effective_method`, which reads the *built* model (prompt tokens, requires_grad, adapter
and LoRA parameters, proxy class) and names the method it matches. metrics.json records
the latter, so a result is labelled with what trained, not with what the config said.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn as nn

from vpt_dml.models.params import parameter_breakdown
from vpt_dml.models.prompted_vit import layer_counts

# prompts: which layers hold shared prompt tokens: none, shallow (layer 0 only), deep (more)
PEFT_METHODS: dict[str, dict] = {
    "linear": {
        "prompts": {"none"},
        "bitfit": False,
        "full": False,
        "adapter": False,
        "lora": False,
    },
    "bitfit": {"prompts": {"none"}, "bitfit": True, "full": False, "adapter": False, "lora": False},
    "vpt_shallow": {
        "prompts": {"shallow"},
        "bitfit": False,
        "full": False,
        "adapter": False,
        "lora": False,
    },
    "vpt_deep": {
        "prompts": {"deep"},
        "bitfit": False,
        "full": False,
        "adapter": False,
        "lora": False,
    },
    "vptsp": {
        "prompts": {"shallow", "deep"},
        "bitfit": True,
        "full": False,
        "adapter": False,
        "lora": False,
    },
    "adapter": {
        "prompts": {"none"},
        "bitfit": False,
        "full": False,
        "adapter": True,
        "lora": False,
    },
    "lora": {"prompts": {"none"}, "bitfit": False, "full": False, "adapter": False, "lora": True},
    "full": {"prompts": {"none"}, "bitfit": False, "full": True, "adapter": False, "lora": False},
}
# a deliberate mix of switches (e.g. adapter + BitFit): no signature to match
CUSTOM = "custom"
SWITCHES = ("bitfit", "full", "adapter", "lora")


def prompt_depth_kind(counts: Sequence[int]) -> str:
    layers = sum(1 for n in counts if n > 0)
    return "none" if layers == 0 else "shallow" if layers == 1 and counts[0] > 0 else "deep"


def features_from_config(peft: Mapping) -> dict:
    """The features of a `model.peft` node, as PEFT_METHODS spells them."""
    p = peft.get("prompts") or {}
    depth = int(p.get("depth") or 0)
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


def describe(features: Mapping) -> str:
    """Human words for a feature set, e.g. 'deep prompts + BitFit'."""
    parts = [f"{features['prompts']} prompts"] if features["prompts"] != "none" else []
    names = {
        "bitfit": "BitFit",
        "full": "all backbone weights",
        "adapter": "adapters",
        "lora": "LoRA",
    }
    parts += [names[k] for k in SWITCHES if features[k]]
    return " + ".join(parts) or "the head only"


def _backbone_features(vit: nn.Module) -> dict:
    """Which backbone parameters train: biases only (BitFit), every weight (full),
    and whether adapter / LoRA parameters exist (they always train)."""
    adapter = lora = False
    n_bias = n_weight = train_bias = train_weight = 0
    for name, p in vit.named_parameters():
        if ".adapter" in name or name.startswith("adapter"):
            adapter = True
        elif ".lora_" in name or name.startswith("lora_"):
            lora = True
        elif name.endswith(".bias") or name == "bias":
            n_bias += 1
            train_bias += p.requires_grad
        else:
            n_weight += 1
            train_weight += p.requires_grad
    full = n_weight > 0 and train_weight == n_weight
    bitfit = not full and n_bias > 0 and train_bias == n_bias and train_weight == 0
    partial = not full and not bitfit and (train_weight > 0 or train_bias > 0)
    return {"bitfit": bitfit, "full": full, "adapter": adapter, "lora": lora, "partial": partial}


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
    bb = _backbone_features(backbone.vit)
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
