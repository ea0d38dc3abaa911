"""timm Vision Transformer backbones: creation, what was built, preprocessing config.

`create_backbone` builds a timm ViT without its classifier; a local weights file
(`model.backbone.weights`) is loaded strictly by models/weights.py, timm's hub weights by
timm. The built architecture is read off the model object (`built_report`, recorded in
metrics.json), never taken from the config's name.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from vpt_dml.errors import UserError, WeightsError
from vpt_dml.models.weights import WEIGHT_SUFFIXES, _weights_error, load_weights

log = logging.getLogger("vpt_dml")
_BUILT_ATTR = "built_report"


def create_backbone(
    name: str,
    pretrained: bool = False,
    weights: str | None = None,
    kwargs: dict | None = None,
) -> VisionTransformer:
    """A timm ViT without its classifier. `weights` (a local file) wins over the hub."""
    kwargs = dict(kwargs or {})
    path = None
    if weights:
        path = Path(weights).expanduser()
        if path.is_dir():
            found = sorted(p.name for p in path.iterdir() if p.suffix.lower() in WEIGHT_SUFFIXES)
            hint = f" (it holds {', '.join(found[:3])})" if found else " (it holds no such file)"
            raise WeightsError(
                f"model.backbone.weights={weights} is a folder{hint}; give the checkpoint file "
                f"itself: model.backbone.weights={path / (found[0] if found else 'model.safetensors')}"
            )
        if not path.is_file():
            raise WeightsError(
                f"model.backbone.weights={weights} does not exist; give the path of a downloaded "
                f"{name} checkpoint (.safetensors/.bin/.npz) or use model.backbone.pretrained=true with network"
            )
        pretrained = False  # random init here, replaced strictly by load_weights
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UserError(
                f"timm has no model {name!r}; see timm.list_models('vit_*') for valid names"
            ) from None
        raise _weights_error(name, e, pretrained) from None
    except (OSError, ValueError, ImportError) as e:
        if not pretrained:
            raise
        raise _weights_error(name, e, pretrained) from None
    if not isinstance(model, VisionTransformer):
        raise UserError(
            f"{name} is a {type(model).__name__}, not a timm VisionTransformer; pick a ViT (vit_*, deit_*)"
        )
    if path is not None:
        load_weights(model, name, path)
    setattr(model, _BUILT_ATTR, built_architecture(model))
    return model


def built_architecture(vit: nn.Module) -> dict:
    """What was built, read off the model object (not the config): timm's architecture
    name, width, depth, heads, patch and image size, parameter count. `metrics.json`
    records it beside the configured name, so a name never stands for another model.
    A hybrid ViT's patch is its CNN stem's stride (image size / token grid)."""
    embed = getattr(vit, "patch_embed", None)
    img = tuple(int(v) for v in getattr(embed, "img_size", None) or ()) or None
    grid = tuple(int(v) for v in getattr(embed, "grid_size", None) or ()) or None
    patch = tuple(i // g for i, g in zip(img, grid)) if img and grid else None
    blocks = getattr(vit, "blocks", ())
    attn = getattr(blocks[0], "attn", None) if len(blocks) else None
    return {
        "architecture": (getattr(vit, "pretrained_cfg", None) or {}).get("architecture"),
        "class": type(vit).__name__,
        "patch_embed": type(embed).__name__ if embed is not None else None,
        "width": int(getattr(vit, "embed_dim", getattr(vit, "num_features", 0))),
        "depth": len(blocks),
        "num_heads": int(attn.num_heads)
        if attn is not None and hasattr(attn, "num_heads")
        else None,
        "patch_size": list(patch) if patch else None,
        "image_size": list(img) if img else None,
        "prefix_tokens": int(getattr(vit, "num_prefix_tokens", 1)),
        "parameters": sum(p.numel() for p in vit.parameters()),
        "batchnorm_layers": sum(
            1 for m in vit.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
        ),
    }


def built_report(vit: nn.Module) -> dict:
    """`built_architecture` as the backbone was created, before PEFT added adapters or
    LoRA (create_backbone attaches it); computed now for a ViT made elsewhere."""
    return dict(getattr(vit, _BUILT_ATTR, None) or built_architecture(vit))


def data_config(model: nn.Module) -> dict:
    """Input size, mean and std the backbone was pretrained with (timm's pretrained cfg)."""
    cfg = timm.data.resolve_model_data_config(model)
    # the model's actual input size wins over the pretrained cfg (tiny test models use 32/64 px)
    size = (
        int(model.patch_embed.img_size[-1])
        if hasattr(model, "patch_embed")
        else int(cfg["input_size"][-1])
    )
    return {"image_size": size, "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
