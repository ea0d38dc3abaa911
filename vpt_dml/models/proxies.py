"""The proxies a run trains, one factory per `model.proxy` option (its `_target_`).

`learned`: plain learnable proxies (Proxy Anchor's own), one free E-dim vector per class;
`semantic_mix` / `semantic_gru`: VPTSP's semantic proxies (models/semantic_proxies.py).
A new proxy kind is a new factory here and a conf/model/proxy/<name>.yaml naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from vpt_dml.errors import UserError
from vpt_dml.models.depth import prompt_counts
from vpt_dml.models.semantic_proxies import SemanticProxies


class LearnedProxies(nn.Module):
    def __init__(self, num_classes: int, embed_dim: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.empty(num_classes, embed_dim))
        # Proxy Anchor's init: kaiming-normal (fan_out), proxies then normalised in the loss.
        nn.init.kaiming_normal_(self.bias, mode="fan_out")

    def forward(self, images, labels, backbone) -> torch.Tensor:  # noqa: ARG002 - same call as semantic
        return F.normalize(self.bias, dim=-1)


@dataclass(frozen=True)
class ProxyContext:
    """What `build_model` knows and a proxy factory needs: never in the config."""

    num_classes: int
    feature_dim: int  # the backbone's pooled feature (the semantic branch's input)
    embed_dim: int  # the embedding the proxies live in
    num_layers: int
    in_batch: bool  # loss.proxy_range=in_batch: the batch classes' rows, as the reference


# `model.proxy` is a `_target_` node naming one of these factories (`_partial_`: the context
# comes from the built model). Their signatures are the config: runs/config_schema.py's walker
# refuses a key a factory does not take, and a value outside a Literal.
def learned(context: ProxyContext, /, kind: Literal["learned"] = "learned") -> nn.Module:
    """Plain learnable proxies (Proxy Anchor's own), trained at optim.lr_proxy."""
    return LearnedProxies(context.num_classes, context.embed_dim)


def semantic_mix(
    context: ProxyContext,
    /,
    kind: Literal["semantic_mix"] = "semantic_mix",
    class_prompts: dict | None = None,
    bias_ratio: float = 0.5,
    class_prompt_store: Literal["device", "host"] = "device",
    class_prompt_dtype: Literal["float32", "bfloat16"] = "float32",
    class_prompt_step: Literal["per_row", "global"] = "per_row",
    mix_lambda: float = 0.8,
) -> nn.Module:
    """VPTSP (no G): H[c] = lam*H[c] + (1-lam)*mean(s_c), rows re-normalised."""
    return _semantic(
        context,
        "mix",
        class_prompts,
        bias_ratio,
        class_prompt_store,
        class_prompt_dtype,
        class_prompt_step,
        mix_lambda=mix_lambda,
    )


def semantic_gru(
    context: ProxyContext,
    /,
    kind: Literal["semantic_gru"] = "semantic_gru",
    class_prompts: dict | None = None,
    bias_ratio: float = 0.5,
    class_prompt_store: Literal["device", "host"] = "device",
    class_prompt_dtype: Literal["float32", "bfloat16"] = "float32",
    class_prompt_step: Literal["per_row", "global"] = "per_row",
    update: Literal["gru", "gru_relu"] = "gru_relu",
    dropout: float = 0.0,
) -> nn.Module:
    """VPTSP-G: class prompts -> proxy head -> GRU-style fold into the memory H."""
    return _semantic(
        context,
        update,
        class_prompts,
        bias_ratio,
        class_prompt_store,
        class_prompt_dtype,
        class_prompt_step,
        dropout=dropout,
    )


def _semantic(
    context: ProxyContext,
    update: str,
    class_prompts: Mapping | None,
    bias_ratio: float,
    store: str,
    dtype: str,
    step: str,
    dropout: float = 0.0,
    mix_lambda: float = 0.8,
) -> SemanticProxies:
    counts = prompt_counts(class_prompts or {}, context.num_layers, "model.proxy.class_prompts")
    if not 0.0 <= bias_ratio <= 1.0:
        raise UserError(f"model.proxy.bias_ratio={bias_ratio} must lie in [0, 1]")
    if store not in ("device", "host"):
        raise UserError(f"model.proxy.class_prompt_store={store!r}; use device or host")
    return SemanticProxies(
        context.num_classes,
        context.feature_dim,
        context.embed_dim,
        counts,
        update=update,
        bias_ratio=bias_ratio,
        dropout=dropout,
        mix_lambda=mix_lambda,
        class_prompt_store=store,
        class_prompt_dtype=dtype,  # host storage
        class_prompt_step=step,  # global | per_row: the host bank's Adam step count
        in_batch_proxies=context.in_batch,
    )


# configs written before `model.proxy` had a `_target_` (checkpoints, hand-made mappings)
# name their factory by `kind`
BY_KIND = {f.__name__: f for f in (learned, semantic_mix, semantic_gru)}
