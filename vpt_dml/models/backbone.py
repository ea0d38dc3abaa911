"""timm Vision Transformer backbones: creation, pretrained weights, preprocessing config."""

from __future__ import annotations

from pathlib import Path

import timm
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from vpt_dml.errors import UserError, WeightsError


def create_backbone(
    name: str,
    pretrained: bool = False,
    weights: str | None = None,
    kwargs: dict | None = None,
) -> VisionTransformer:
    """A timm ViT without its classifier. `weights` (a local file) wins over the hub."""
    kwargs = dict(kwargs or {})
    extra: dict = {}
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"model.backbone.weights={weights} does not exist; give the path of a downloaded "
                f"{name} checkpoint (.safetensors/.bin/.npz) or use model.backbone.pretrained=true with network"
            )
        pretrained = True
        extra["pretrained_cfg_overlay"] = dict(file=str(path))
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs, **extra)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UserError(
                f"timm has no model {name!r}; see timm.list_models('vit_*') for valid names"
            ) from None
        raise _weights_error(name, e) from None
    except (OSError, ValueError, ImportError) as e:
        if not pretrained:
            raise
        raise _weights_error(name, e) from None
    if not isinstance(model, VisionTransformer):
        raise UserError(
            f"{name} is a {type(model).__name__}, not a timm VisionTransformer; pick a ViT (vit_*, deit_*)"
        )
    return model


def _weights_error(name: str, cause: Exception) -> WeightsError:
    first = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else type(cause).__name__
    return WeightsError(
        f"could not load pretrained weights for {name} ({first}); either allow downloads from the "
        f"Hugging Face hub (model.backbone.pretrained=true) or download the checkpoint yourself and set "
        f"model.backbone.weights=/path/to/model.safetensors"
    )


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
