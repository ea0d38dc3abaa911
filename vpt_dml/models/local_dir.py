"""`model.backbone.name=local-dir:/path`: a timm model folder, with its own preprocessing.

A folder as timm writes it (`timm.models.save_for_hf`, or a Hugging Face hub snapshot:
`config.json` + `model.safetensors`): config.json names the architecture, its model_args
and a `pretrained_cfg` with the preprocessing the weights were trained with (mean, std,
interpolation, crop). timm builds the architecture from it (`local-dir:` model names);
the weights are loaded here with the strict loader of models/backbone.py (timm's own
loader would drop the classifier and then load non-strictly). A hub cache folder
(`models--org--name`) resolves to its `refs/main` snapshot.

The folder's mean and std reach the training and evaluation transforms through the
model's pretrained_cfg (`backbone.data_config`); its interpolation and crop are recorded,
and a warning names them when they differ from what the suite's transforms apply
(bilinear, Resize(size*256/224) + CenterCrop: the protocol of METHOD.md §4). A folder
whose preprocessing differs from the architecture's default is named in a warning, and so
is a bare `model.backbone.weights` file with a config.json beside it that says so (the
trap of SigLIP 2 weights read with the architecture's default normalisation).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import timm
import torch.nn as nn
from timm.models import get_pretrained_cfg

from vpt_dml.errors import UserError, WeightsError

log = logging.getLogger("vpt_dml")

PREFIX = "local-dir:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")
# what data/transforms.py applies, whatever a pretrained_cfg says
APPLIED = {"interpolation": "bilinear", "crop_pct": 224 / 256, "crop_mode": "center"}
_ATTR = "preprocessing_report"


def is_local_dir(name: str) -> bool:
    return str(name).lower().startswith(PREFIX)


def model_folder(name: str) -> Path:
    """The folder holding config.json: the named one, or a hub cache folder's snapshot."""
    folder = Path(str(name)[len(PREFIX) :]).expanduser()
    if (folder / "config.json").is_file():
        return folder
    snapshots = folder / "snapshots"
    if snapshots.is_dir():
        ref = folder / "refs" / "main"
        revs = (
            [ref.read_text().strip()]
            if ref.is_file()
            else sorted(p.name for p in snapshots.iterdir())
        )
        found = [snapshots / r for r in revs if (snapshots / r / "config.json").is_file()]
        if len(found) == 1:
            return found[0]
    what = "does not exist" if not folder.exists() else "has no config.json"
    raise UserError(
        f"model.backbone.name={name}: {folder} {what}; a timm model folder holds config.json "
        "+ model.safetensors (as timm.models.save_for_hf or a Hugging Face hub snapshot writes it)"
    )


def weights_file(folder: Path, name: str) -> Path:
    for fname in WEIGHT_FILES:
        if (folder / fname).is_file():
            return folder / fname
    raise WeightsError(
        f"model.backbone.name={name}: {folder} holds config.json but no weights "
        f"({' or '.join(WEIGHT_FILES[:2])}); copy the checkpoint next to it"
    )


def create_from_folder(name: str, kwargs: dict) -> tuple[nn.Module, Path, str]:
    """(model without classifier, random init, with the folder's pretrained_cfg; its
    weights file; its architecture name). The caller loads the weights strictly."""
    folder = model_folder(name)
    weights = weights_file(folder, name)
    try:
        model = timm.create_model(f"{PREFIX}{folder}", pretrained=False, num_classes=0, **kwargs)
    except (RuntimeError, ValueError, KeyError, json.JSONDecodeError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(
            f"model.backbone.name={name}: timm cannot build a model from {folder / 'config.json'} "
            f"({first}); it must name a timm architecture with its model_args"
        ) from None
    arch = model.pretrained_cfg.get("architecture") or name
    record_preprocessing(model, folder / "config.json")
    return model, weights, arch


def _config_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _values(cfg: dict) -> dict:
    keys = ("mean", "std", "interpolation", "crop_pct", "crop_mode")
    out = {k: cfg.get(k) for k in keys}
    for k in ("mean", "std"):
        out[k] = [float(v) for v in out[k]] if out[k] is not None else None
    return out


def _default_cfg(arch: str) -> dict:
    try:
        cfg = get_pretrained_cfg(arch)
    except Exception:  # noqa: BLE001 - an architecture timm has no default weights for
        return {}
    return cfg.to_dict() if cfg is not None else {}


def record_preprocessing(model: nn.Module, config: Path | None) -> dict:
    """Attach (and log) the preprocessing the model's pretrained_cfg carries, where it
    comes from, the sha256 of its config, and what the transforms apply."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    arch = cfg.get("architecture") or type(model).__name__
    values = _values(cfg)
    if config is not None:
        source, digest = f"local-dir:{config.parent}", _config_sha256(config)
    else:
        source = f"timm pretrained_cfg of {arch}" + (f".{cfg['tag']}" if cfg.get("tag") else "")
        canon = json.dumps(values, sort_keys=True).encode()
        digest = hashlib.sha256(canon).hexdigest()
    report = {
        "source": source,
        "config_sha256": digest,
        **values,
        "applied": {"mean": values["mean"], "std": values["std"], **APPLIED},
    }
    if config is not None:
        default = _values(_default_cfg(arch))
        differs = [k for k in ("mean", "std") if default[k] and values[k] != default[k]]
        report["architecture_default"] = default
        if differs:
            log.warning(
                "backbone preprocessing: %s gives %s, not %s's default (%s); the folder's is used",
                source,
                ", ".join(f"{k}={values[k]}" for k in differs),
                arch,
                ", ".join(f"{k}={default[k]}" for k in differs),
            )
    unapplied = [
        k
        for k in ("interpolation", "crop_pct")
        if values[k] is not None and values[k] != APPLIED[k]
    ]
    if unapplied and config is not None:  # a folder's own choice; timm defaults only recorded
        log.warning(
            "backbone preprocessing: %s asks for %s; the transforms apply %s (METHOD.md §4)",
            source,
            ", ".join(f"{k}={values[k]}" for k in unapplied),
            ", ".join(
                f"{k}={APPLIED[k]:.4g}" if k == "crop_pct" else f"{k}={APPLIED[k]}"
                for k in unapplied
            ),
        )
    setattr(model, _ATTR, report)
    return report


def preprocessing_report(model: nn.Module) -> dict:
    report = getattr(model, _ATTR, None)
    return dict(report) if report is not None else record_preprocessing(model, None)


def warn_config_beside(model: nn.Module, weights: Path) -> None:
    """A bare weights file with a config.json beside it whose mean/std differ from the
    architecture's (the defaults used for a bare file): name both in a warning."""
    config = weights.parent / "config.json"
    if not config.is_file():
        return
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return
    beside = _values(data.get("pretrained_cfg") or data)
    used = _values(dict(getattr(model, "pretrained_cfg", None) or {}))
    differs = [k for k in ("mean", "std") if beside[k] and used[k] and beside[k] != used[k]]
    if differs:
        log.warning(
            "backbone preprocessing: %s beside model.backbone.weights=%s gives %s, but the "
            "architecture's default (%s) is used; model.backbone.name=local-dir:%s uses the folder's",
            config,
            weights,
            ", ".join(f"{k}={beside[k]}" for k in differs),
            ", ".join(f"{k}={used[k]}" for k in differs),
            weights.parent,
        )
