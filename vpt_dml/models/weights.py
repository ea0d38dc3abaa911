"""Pretrained weights of the timm ViT backbones: local files (model.backbone.weights)
loaded strictly, and the message when timm's hub weights cannot be had (the backbone
itself is created in models/backbone.py).

A local weights file (`model.backbone.weights`) is loaded here, not by timm: timm's file
loader drops the classifier and then loads non-strictly, so a checkpoint of another
architecture used to leave a random ViT with only an INFO line. Here every backbone
tensor must come from the file with the right shape (the classifier head aside), or the
run stops with one line saying what does not fit and what the file seems to hold.

Accepted: .safetensors; PyTorch files read with torch.load(weights_only=True), either a
state dict or one nested under a usual key ({'state_dict': ...}, {'model': ...}, ...),
with the ViT's keys under a prefix ('backbone.', 'module.', 'model.', ...) stripped; the
original JAX .npz checkpoints through timm's own reader. timm's ViT checkpoint filter
then maps foreign layouts (OpenAI/OpenCLIP, DINOv2, DeiT-3 layer scale) and resamples
the position embedding to the model's image size, as timm's pretrained loading does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from vpt_dml.errors import WeightsError

log = logging.getLogger("vpt_dml")

# where trainers usually put the model's state dict inside a checkpoint, most likely first
NESTED_KEYS = (
    "state_dict",
    "model",
    "model_state_dict",
    "model_state",
    "module",
    "teacher",
    "net",
    "network",
    "params",
    "model_ema",
    "state_dict_ema",
)
# keys whose suffix locates a ViT state dict under a prefix
ANCHORS = ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.norm1.weight")
_REPORT_ATTR = "weights_report"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".npz", ".ckpt")


def weights_report(vit: nn.Module) -> dict | None:
    """Provenance of the weights file the ViT was loaded from (None: hub or random init):
    file, size_bytes, sha256, format, nested_key, prefix_stripped, missing, unexpected
    (None for .npz, whose reader takes only the keys it needs), mis_shaped,
    classifier_keys_dropped, keys_outside_prefix."""
    report = getattr(vit, _REPORT_ATTR, None)
    return dict(report) if report is not None else None


def load_weights(model: VisionTransformer, name: str, path: Path) -> dict:
    """Load `path` into `model` strictly; attach and return its weights_report."""
    fmt = _file_format(path)
    report: dict[str, Any] = {
        "file": str(path.resolve()),
        "size_bytes": path.stat().st_size,
        "sha256": _sha256(path),
        "format": fmt,
        "nested_key": None,
        "prefix_stripped": None,
        "missing": 0,
        "unexpected": 0,
        "mis_shaped": 0,
        "classifier_keys_dropped": 0,
        "keys_outside_prefix": 0,
    }
    if fmt == "npz":
        _load_npz(model, name, path)
        report["unexpected"] = None
    else:
        raw = _read_state(path, fmt)
        state, report["nested_key"] = _unwrap(raw, path)
        state, prefix, outside = _strip_prefix(state)
        report["prefix_stripped"], report["keys_outside_prefix"] = prefix or None, outside
        try:
            # timm's own filter (as for the hub): foreign layouts, pos-embed resampling
            state = partial(checkpoint_filter_fn, adapt_layer_scale=True)(dict(state), model)
        except Exception:  # noqa: BLE001 - a foreign file: the strict check below says why
            pass
        report["classifier_keys_dropped"] = _load_strict(model, name, path, state)
    setattr(model, _REPORT_ATTR, report)
    where = [f"under '{report['nested_key']}'"] if report["nested_key"] else []
    if report["prefix_stripped"]:
        where.append(f"prefix '{report['prefix_stripped']}' stripped")
    if report["keys_outside_prefix"]:
        where.append(f"{report['keys_outside_prefix']} keys outside it ignored")
    log.info(
        "backbone weights: %s (%s, sha256 %s) loaded into %s, every tensor present%s",
        path,
        fmt,
        report["sha256"][:12],
        name,
        f" ({', '.join(where)})" if where else "",
    )
    return report


# -- reading ------------------------------------------------------------------------------
def _file_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".safetensors", ".npz"):
        return suffix[1:]
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header
    return "safetensors" if len(head) == 9 and head[8:9] == b"{" else "torch"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0][:160] if text else ""
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _read_state(path: Path, fmt: str) -> Any:
    if fmt == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - any failure means: not a safetensors file
            raise WeightsError(
                f"model.backbone.weights={path} is not a readable safetensors file "
                f"({_first_line(e)}); download the checkpoint again or point at the right file"
            ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - garbage, truncated or refused
        text = str(e)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if refused:
            raise WeightsError(
                f"model.backbone.weights={path} holds Python objects ({refused.group(1)}) that "
                "torch.load(weights_only=True) refuses to unpickle, as they could run code; save a "
                "plain state dict (torch.save(model.state_dict(), ...)) or a .safetensors file"
            ) from None
        # the weights-only unpickler's long notice says nothing about a non-pickle file
        reason = "not a pickle or zip archive" if "Weights only load failed" in text else None
        raise WeightsError(
            f"model.backbone.weights={path} is not a readable PyTorch checkpoint "
            f"({reason or _first_line(e)}); expected a .safetensors, .pth/.bin state dict or .npz file"
        ) from None


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict inside a checkpoint, and the key path it was nested under."""
    trail: list[str] = []
    while isinstance(obj, Mapping) and not _is_state_dict(obj) and len(trail) < 4:
        key = next((k for k in NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        trail.append(key)
        obj = obj[key]
    if isinstance(obj, Mapping) and len(obj) > 0:
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and all(isinstance(k, str) for k in tensors):
            return tensors, ".".join(trail) or None
    what = (
        f"a dict with keys {', '.join(map(str, list(obj)[:4]))}"
        if isinstance(obj, Mapping)
        else f"a {type(obj).__name__}"
    )
    raise WeightsError(
        f"model.backbone.weights={path} holds {what}, not a state dict of tensors; "
        "save the backbone's state_dict() (or a .safetensors file)"
    )


def _strip_prefix(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, int]:
    """(state without the prefix, the prefix, keys outside it) for a ViT under a prefix."""
    if any(a in state for a in ANCHORS):
        return state, "", 0
    for anchor in ANCHORS:
        hit = next((k for k in state if k.endswith("." + anchor)), None)
        if hit is not None:
            prefix = hit[: -len(anchor)]
            inside = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            return inside, prefix, len(state) - len(inside)
    return state, "", 0


# -- strict loading -----------------------------------------------------------------------
def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    return (names,) if isinstance(names, str) else tuple(names)


def _load_strict(model: nn.Module, name: str, path: Path, state: Mapping[str, Any]) -> int:
    """Copy `state` into `model` if every tensor fits; returns the classifier keys dropped."""
    own = model.state_dict()
    classifier = _classifier_names(model)
    dropped = [
        k
        for k in state
        if k not in own and any(k == c or k.startswith(c + ".") for c in classifier)
    ]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and k not in dropped]
    mis_shaped = [
        (k, tuple(state[k].shape), tuple(own[k].shape))
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mis_shaped:
        raise WeightsError(
            _mismatch_message(name, path, own, state, missing, unexpected, mis_shaped)
        )
    model.load_state_dict({k: state[k] for k in own}, strict=True)
    return len(dropped)


def _examples(keys: list[str]) -> str:
    return f" (e.g. {', '.join(keys[:2])})" if keys else ""


def _mismatch_message(name, path, own, state, missing, unexpected, mis_shaped) -> str:
    shapes = "".join(f" (e.g. {k}: file {list(a)}, model {list(b)})" for k, a, b in mis_shaped[:1])
    return (
        f"model.backbone.weights={path} does not fit {name} ({describe_architecture(own)}): "
        f"{len(missing)} of {len(own)} backbone tensors missing{_examples(missing)}, "
        f"{len(unexpected)} unexpected{_examples(unexpected)}, {len(mis_shaped)} mis-shaped{shapes}; "
        f"the file seems to hold {describe_architecture(state)}; "
        f"point it at a {name} checkpoint or set model.backbone.name to the file's architecture"
    )


# (key pattern, what a state dict holding it is), checked in order after the ViT test
KEY_SIGNATURES = (
    (
        r"(^|\.)encoder\.layer\.0\.attention\.",
        "a Hugging Face transformers model ('encoder.layer.0.attention'), whose key names "
        "timm does not read",
    ),
    (r"transformer\.resblocks\.0\.", "an OpenAI CLIP model ('transformer.resblocks')"),
    (r"Transformer/encoderblock_0/", "a JAX ViT (.npz 'Transformer/encoderblock_0')"),
    (r"(^|/)block1/unit01/|resnet/root_block", "a BiT ResNet (.npz 'block1/unit01')"),
    (r"(^|\.)features\.denseblock", "a DenseNet ('features.denseblockN')"),
    (r"(^|\.)conv_stem\.", "an EfficientNet/MobileNet ('conv_stem')"),
    (
        r"(^|\.)features\.\d+\.",
        "a torchvision CNN such as VGG/MobileNet/EfficientNet ('features.N')",
    ),
    (r"(^|\.)stages\.0\.", "a staged CNN such as RegNet ('stages.N')"),
)


def describe_architecture(state: Mapping[str, Any]) -> str:
    """A guess at the architecture a state dict (or .npz key list) belongs to, from key names."""
    keys = list(state)
    joined = "\n".join(keys)

    def has(pattern: str) -> bool:
        return re.search(pattern, joined, re.MULTILINE) is not None

    if has(r"(^|\.)layer1\.0\.(conv1|bn1)"):
        return "a ResNet ('layer1.0.conv1')"
    if has(r"(^|\.)layers\.0\.blocks\.0\."):
        return "a Swin Transformer ('layers.0.blocks')"
    if has(r"(^|\.)downsample_layers\.0") or (has(r"(^|\.)stages\.0\.") and has(r"conv_dw|dwconv")):
        return "a ConvNeXt ('stages.N ... conv_dw')"
    if has(r"(^|\.)blocks\.0\.attn\."):
        return _describe_vit(state, keys)
    for pattern, what in KEY_SIGNATURES:
        if has(pattern):
            return what
    return f"an unrecognised architecture (first keys: {', '.join(keys[:2]) or 'none'})"


def _describe_vit(state: Mapping[str, Any], keys: list[str]) -> str:
    depth = len({m.group(1) for k in keys if (m := re.search(r"(?:^|\.)blocks\.(\d+)\.", k))})
    parts = []
    proj = next((state[k] for k in keys if k.endswith("patch_embed.proj.weight")), None)
    if isinstance(proj, torch.Tensor) and proj.dim() == 4:
        parts += [f"width {proj.shape[0]}", f"patch {proj.shape[-1]}"]
    parts.insert(min(1, len(parts)), f"{depth} blocks")
    pos = next((state[k] for k in keys if k.endswith("pos_embed")), None)
    if isinstance(pos, torch.Tensor) and pos.dim() == 3:
        parts.append(f"{pos.shape[1]} position embeddings")
    tokens = [t for t in ("dist_token", "reg_token") if any(k.endswith(t) for k in keys)]
    kind = "a distilled DeiT" if "dist_token" in tokens else "a ViT"
    if "reg_token" in tokens:
        kind += " with registers"
    return f"{kind} ({', '.join(parts)})"


def _load_npz(model: VisionTransformer, name: str, path: Path) -> None:
    """Original JAX checkpoints through timm's reader; a tensor it did not set is missing."""
    import zipfile

    import numpy as np

    if not zipfile.is_zipfile(path):  # else np.load tries it as a pickle and says so
        raise WeightsError(
            f"model.backbone.weights={path} is not a readable .npz archive (not a zip file); "
            "expected a JAX ViT .npz, a .safetensors or a .pth/.bin state dict"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = list(npz.files)
    except Exception as e:  # noqa: BLE001 - not an .npz archive
        raise WeightsError(
            f"model.backbone.weights={path} is not a readable .npz archive ({_first_line(e)}); "
            "expected a JAX ViT .npz, a .safetensors or a .pth/.bin state dict"
        ) from None
    own = model.state_dict()
    with torch.no_grad():  # a NaN left after the load marks a tensor the file did not set
        for t in own.values():
            if t.is_floating_point():
                t.fill_(float("nan"))
    try:
        model.load_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - missing key or wrong shape inside timm's reader
        raise WeightsError(
            f"model.backbone.weights={path} does not fit {name} ({_first_line(e)}); "
            f"the file seems to hold {describe_architecture(dict.fromkeys(files))}; "
            f"point it at a {name} checkpoint or set model.backbone.name to the file's architecture"
        ) from None
    missing = [
        k for k, t in model.state_dict().items() if t.is_floating_point() and t.isnan().any()
    ]
    if missing:
        raise WeightsError(
            f"model.backbone.weights={path} does not fit {name}: {len(missing)} of {len(own)} "
            f"backbone tensors not in the .npz{_examples(missing)}; point it at a {name} checkpoint"
        )


def _weights_error(name: str, cause: Exception, pretrained: bool = False) -> WeightsError:
    first = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else type(cause).__name__
    if pretrained:  # already asked for the hub: say what stands in its way, not to ask again
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        reach = (
            "HF_HUB_OFFLINE is set in the environment: unset it"
            if offline
            else "this machine could not fetch it from the Hugging Face hub: check the network "
            "(or HF_ENDPOINT / proxy settings)"
        )
        return WeightsError(
            f"could not load timm's pretrained weights for {name} ({first}); {reach}, or download "
            f"the checkpoint elsewhere and set model.backbone.weights=/path/to/model.safetensors"
        )
    return WeightsError(
        f"could not load pretrained weights for {name} ({first}); either allow downloads from the "
        f"Hugging Face hub (model.backbone.pretrained=true) or download the checkpoint yourself and set "
        f"model.backbone.weights=/path/to/model.safetensors"
    )
