"""The one place the model is assembled from the run config.

`build_model(cfg, num_classes)` reads the `model` group (backbone, PEFT switches, shared
prompts, head, proxy kind) and the `loss` group's proxy range, and returns the image
branch (`Embedder`), the proxies and the training step's outputs function, with the
fused-or-two-pass choice made here, once. A new PEFT method goes into models/peft.py, a
new proxy kind is a factory in models/proxies.py named by its conf/model/proxy/ option's
`_target_`; nothing else has to know.

`prepare_backbone(model_cfg)` is the separate preparation step that makes the demo's
backbone weights file (synthetic pretraining) before anything is built; building never
trains.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from vpt_dml.errors import UserError
from vpt_dml.models.backbone import create_backbone
from vpt_dml.models.depth import prompt_counts
from vpt_dml.models.embedder import Embedder
from vpt_dml.models.heads import EmbeddingHead
from vpt_dml.models.peft import apply_peft
from vpt_dml.models.precision import cast_frozen_weights_
from vpt_dml.models.prompted_vit import PromptedViT
from vpt_dml.models.proxies import BY_KIND, ProxyContext
from vpt_dml.models.semantic_proxies import SemanticProxies
from vpt_dml.models.synthetic_pretraining import pretrain_backbone

log = logging.getLogger("vpt_dml")

# keys of a `_target_` node that are Hydra's, not the factory's
HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_")

# (images, labels) -> (embeddings, proxies) of one training step
TrainingOutputs = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Model:
    embedder: Embedder
    proxies: nn.Module
    training_outputs: TrainingOutputs
    fused: bool  # both branches in one pass (PromptedViT.forward_branches)


def require_vit(name: str) -> None:
    """One line instead of a constructor's TypeError when `name` is not a timm ViT.

    Built on the meta device without kwargs: no memory, no weights, ~0.1 s.
    """
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception:  # noqa: BLE001 - unknown names are create_backbone's to report
        return
    if not isinstance(model, VisionTransformer):
        raise UserError(
            f"{name} is a {type(model).__name__}, not a timm VisionTransformer; "
            "pick a ViT (vit_*, deit_*)"
        )


# a backbone option's own settings that describe one architecture (kwargs), or one
# architecture's weights (weights, synthetic_pretraining): neutral values first
OPTION_SETTINGS = {"kwargs": {}, "weights": None, "synthetic_pretraining": None}


def check_backbone_option(b: Mapping) -> None:
    """Refuse a backbone name that the chosen option's own settings do not describe.

    An option such as vit_tiny_demo sets `option_for: vit_tiny_patch16_224` beside its
    kwargs (64 px, width 96, depth 4) and weights file. `model.backbone.name=X` alone
    replaces only the name: the run would build the option's architecture (or load its
    weights) under the name X. Refused in one line pointing at model/backbone=timm, the
    option that builds any timm ViT by name as timm defines it.
    """
    name = b.get("name")
    if name in (None, "", "???"):
        raise UserError(
            "model.backbone.name is not set; name a timm ViT, e.g. "
            "model/backbone=timm model.backbone.name=vit_small_patch16_224"
        )
    owner = b.get("option_for")
    if not owner or name == owner:
        return
    require_vit(name)  # a non-ViT name: that is the line to give
    kept = [
        f"{key}={_short(b.get(key))}"
        for key, neutral in OPTION_SETTINGS.items()
        if b.get(key) not in (neutral, {}, None)
    ]
    if kept:
        pretrained = "true" if b.get("pretrained") else "false"
        raise UserError(
            f"model.backbone.name={name} keeps the backbone option's settings for {owner} "
            f"({'; '.join(kept)}), which would build or load {owner}'s model under the name "
            f"{name}; choose the option that builds any timm ViT as timm defines it: "
            f"model/backbone=timm model.backbone.name={name} model.backbone.pretrained={pretrained}"
        )


def _short(value) -> str:
    if isinstance(value, Mapping):
        inner = ", ".join(f"{k}: {_short(v)}" for k, v in value.items())
        return "{" + inner + "}"
    return str(value)


def prepare_backbone(model_cfg: Mapping) -> Path | None:
    """Make the demo's backbone weights file once (synthetic pretraining), if asked for.

    Only for the spec's own output file: a mistyped weights path must fail, not be invented.
    """
    b = model_cfg["backbone"]
    check_backbone_option(b)
    spec = dict(b.get("synthetic_pretraining") or {})
    if not (spec and b.get("weights") and str(b["weights"]) == str(spec.get("output"))):
        return None
    require_vit(b["name"])
    return pretrain_backbone(b["name"], dict(b.get("kwargs") or {}), spec.pop("output"), **spec)


def build_embedder(model_cfg: Mapping) -> Embedder:
    """Backbone (frozen), PEFT switches (peft.py), shared prompts, checkpointing, head."""
    b = model_cfg["backbone"]
    check_backbone_option(b)
    try:
        vit = create_backbone(
            b["name"], b.get("pretrained", False), b.get("weights"), b.get("kwargs")
        )
    except TypeError as e:  # a non-ViT constructor refusing the ViT kwargs
        require_vit(b["name"])
        raise UserError(f"model.backbone.kwargs do not fit {b['name']}: {e}") from None
    peft = model_cfg["peft"]
    apply_peft(vit, peft)
    p = peft.get("prompts") or {}
    counts = prompt_counts(p, len(vit.blocks), "model.peft.prompts")
    backbone = PromptedViT(vit, counts)
    backbone.set_grad_checkpointing(model_cfg.get("grad_checkpointing", False))
    embed_dim = model_cfg.get("embed_dim")
    head = EmbeddingHead(vit.embed_dim, embed_dim) if embed_dim else None
    return Embedder(backbone, head)


def build_proxies(
    proxy_cfg: Mapping,
    num_classes: int,
    feature_dim: int,
    embed_dim: int,
    num_layers: int,
    loss_cfg: Mapping | None = None,
) -> nn.Module:
    """`model.proxy`: its `_target_` (a factory of models/proxies.py, or any callable taking the context
    first and the node's keys), or for an older config its `kind`."""
    context = ProxyContext(
        num_classes,
        feature_dim,
        embed_dim,
        num_layers,
        in_batch=(loss_cfg or {}).get("proxy_range") == "in_batch",
    )
    target = proxy_cfg.get("_target_")
    if target is None:
        kind = proxy_cfg.get("kind", "learned")
        if kind not in BY_KIND:
            raise UserError(
                f"unknown model.proxy.kind {kind!r}; use {', '.join(BY_KIND)} (model/proxy=NAME)"
            )
        factory = BY_KIND[kind]
    else:
        factory = _locate(str(target))
    return factory(context, **{k: v for k, v in proxy_cfg.items() if k not in HYDRA_KEYS})


def _locate(dotted: str) -> Callable[..., nn.Module]:
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise UserError(
            f"model.proxy._target_={dotted} cannot be imported; pick an option of model/proxy"
        ) from None


def two_pass_outputs(
    embedder: Embedder, proxies: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image branch, then the proxies (the semantic branch runs its own ViT pass)."""
    return embedder(images), proxies(images, labels, embedder.backbone)


def fused_outputs(
    embedder: Embedder, proxies: SemanticProxies, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`two_pass_outputs` with both branches as one G*B pass: same maths, less work."""
    backbone = embedder.backbone
    branches = [backbone.prompts.per_layer(), proxies.class_prompts.gather(labels)]
    feats, sem = backbone.forward_branches(images, branches)
    return embedder.project(feats), proxies.proxies_from(proxies.head(sem), labels)


def training_outputs(embedder: Embedder, proxies: nn.Module, fused: bool) -> TrainingOutputs:
    """The step's (images, labels) -> (embeddings, proxies); fused only where it applies."""
    if fused and isinstance(proxies, SemanticProxies) and embedder.backbone.fuses_branches:
        return partial(fused_outputs, embedder, proxies)
    return partial(two_pass_outputs, embedder, proxies)


def build_model(cfg: Mapping, num_classes: int) -> Model:
    """From the run config (or any mapping with `model` and optionally `loss`)."""
    model_cfg, loss_cfg = cfg["model"], cfg.get("loss") or {}
    embedder = build_embedder(model_cfg)
    frozen_dtype = model_cfg.get("frozen_weights_dtype")
    if frozen_dtype not in (None, "bfloat16"):
        raise UserError(f"model.frozen_weights_dtype={frozen_dtype!r}; use null or bfloat16")
    if frozen_dtype == "bfloat16":
        # cast once instead of on every autocast step; needs bf16-mixed precision
        cast_frozen_weights_(embedder, torch.bfloat16)
    if model_cfg.get("compile", False):
        embedder.backbone.compile_blocks()
    feature_dim = embedder.feature_dim
    proxies = build_proxies(
        model_cfg.get("proxy") or {},
        num_classes,
        feature_dim,
        model_cfg.get("embed_dim") or feature_dim,
        embedder.backbone.num_layers,
        loss_cfg,
    )
    outputs = training_outputs(embedder, proxies, bool(model_cfg.get("fused_branches", False)))
    fused = outputs.func is fused_outputs
    if (
        model_cfg.get("fused_branches", False)
        and isinstance(proxies, SemanticProxies)
        and not fused
    ):
        log.info(
            "model.fused_branches: %s has blocks the fused pass does not cover; two passes",
            model_cfg["backbone"]["name"],
        )
    return Model(embedder, proxies, outputs, fused)
