"""Method settings that contradict themselves, and values no run can use (`check_config`
in runs/config_schema.py calls these after its walk over the keys and types).

- a `model.peft.name` whose switches are another method's (PEFT_METHODS in
  models/method_summary.py);
- `optim` keys its optimizer and scheduler never read;
(`model.proxy` needs no rule here: its `_target_` names a factory of models/proxies.py,
whose signature the walker checks like any other: unknown keys, types, Literal values.)
- a batch size below 1, a negative learning rate or weight decay, `model.embed_dim=0`
  (no head is spelled `null`), all in POSITIVE / NON_NEGATIVE.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf

from vpt_dml.errors import UserError
from vpt_dml.models.method_summary import (
    CUSTOM,
    PEFT_METHODS,
    SWITCHES,
    describe,
    features_from_config,
    matches,
    peft_method_of,
)

# code reads them from these nodes directly (everything else in optim feeds the
# optimizer / scheduler nodes through interpolation)
OPTIM_READ_BY_CODE = {"lr", "lr_proxy", "weight_decay", "weight_decay_proxy"}


# -- values ----------------------------------------------------------------------------
# key -> how to fix it; null means the code's default here, so it is refused only where
# no default exists (the batch sizes)
POSITIVE = {
    "data.batch_size": "give a multiple of data.samples_per_class, e.g. data.batch_size=64",
    "data.samples_per_class": "give e.g. data.samples_per_class=2",
    "data.eval_batch_size": "give e.g. data.eval_batch_size=256",
    "model.embed_dim": "give e.g. model.embed_dim=384, or model.embed_dim=null for no head "
    "(the raw pooled feature)",
}
NULL_REFUSED = {"data.batch_size", "data.samples_per_class", "data.eval_batch_size"}
NON_NEGATIVE = {
    "optim.lr": "e.g. optim.lr=1e-3",
    "optim.lr_proxy": "e.g. optim.lr_proxy=1e-2",
    "optim.weight_decay": "e.g. optim.weight_decay=1e-4 (0 turns it off)",
    "optim.weight_decay_proxy": "e.g. optim.weight_decay_proxy=0",
}


def check_values(cfg: DictConfig) -> None:
    """Refuse numbers no run can use, before a library fails on them mid-run."""
    for key, fix in POSITIVE.items():
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if value is None:
            if key in NULL_REFUSED and _has(cfg, key):
                raise UserError(f"{key}=null: it must be a positive integer; {fix}")
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 1:
            raise UserError(f"{key}={value} must be a positive integer; {fix}")
    for key, fix in NON_NEGATIVE.items():
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise UserError(f"{key}={value} is negative: it must be 0 or more, {fix}")


def _has(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node


# -- method settings --------------------------------------------------------------------
def check_peft(peft: Mapping) -> None:
    name = peft.get("name")
    if name == CUSTOM:
        return
    if name not in PEFT_METHODS:
        raise UserError(
            f"model.peft.name={name!r} is not a PEFT method; use one of "
            f"{', '.join(PEFT_METHODS)} (model/peft=NAME), or {CUSTOM} for a mix of switches"
        )
    feats = features_from_config(peft)
    if matches(feats, name):
        return
    sig = PEFT_METHODS[name]
    p = peft.get("prompts") or {}
    offending = []
    if feats["prompts"] not in sig["prompts"]:
        offending.append(
            f"model.peft.prompts num={p.get('num')} depth={p.get('depth')} ({feats['prompts']} prompts)"
        )
    keys = {
        "bitfit": "bitfit",
        "full": "full",
        "adapter": "adapter.enabled",
        "lora": "lora.enabled",
    }
    node = peft if isinstance(peft, DictConfig) else OmegaConf.create(dict(peft))
    offending += [
        f"model.peft.{keys[k]}={str(OmegaConf.select(node, keys[k])).lower()}"
        for k in SWITCHES
        if feats[k] != sig[k]
    ]
    actual = peft_method_of(feats)
    fix = (
        f"model/peft={actual} trains {describe(feats)}"
        if actual != CUSTOM
        else "drop those settings"
    )
    raise UserError(
        f"model.peft.name={name} contradicts {', '.join(offending)}: {name} trains "
        f"{describe(sig)}; {fix}, or name a deliberate mix model.peft.name={CUSTOM}"
    )


def check_optim(optim: DictConfig) -> None:
    """A flat optim key neither the code nor the optimizer / scheduler node reads would be
    silently ignored (e.g. optim.momentum with AdamW)."""
    raw = OmegaConf.to_container(optim, resolve=False)
    referenced = set(
        re.findall(r"\$\{\.\.(\w+)\}", str({k: v for k, v in raw.items() if isinstance(v, dict)}))
    )
    for key, value in raw.items():
        if isinstance(value, dict) or key in OPTIM_READ_BY_CODE or key in referenced:
            continue
        target = (raw.get("optimizer") or {}).get("_target_", "the optimizer")
        raise UserError(
            f"optim.{key} is read by nothing: {target} and the scheduler take no {key}; "
            "drop it, or pick the optim option that uses it (e.g. optim=sgd for momentum)"
        )
