"""The library behind `python -m vpt_dml.export RUN_DIR OUT.safetensors`: ship only what training tuned.
(the command itself, its arguments and messages: vpt_dml/export.py).

The file holds the tuned tensors of the image branch (prompts, BitFit biases, head,
adapters / LoRA: whatever had requires_grad), the run's model config and a fingerprint
of the frozen backbone. Loading rebuilds the backbone from timm by name (pretrained as
in the config, or from a local weights file), checks the fingerprint and refuses a
different backbone. Class prompts, GRU, H and the proxy bias are training aids and are
left out (inference uses the image branch only).

A run on a random-init backbone (`pretrained=false`, no weights file) cannot be rebuilt
by name: timm's init differs on every build. Its frozen tensors are written too
(metadata `frozen_included`), so the file loads back on its own; `--onnx` writes the
whole inference-time embedder for another runtime (serving/onnx_export.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from vpt_dml.checkpoints import describe_difference, load_checkpoint, made_with, state_differences
from vpt_dml.errors import UserError
from vpt_dml.models.backbone import data_config
from vpt_dml.models.build import build_embedder
from vpt_dml.models.embedder import Embedder
from vpt_dml.models.params import IMAGE_BRANCH
from vpt_dml.runs.record import RecordUnreadable, read_record

FORMAT = "vpt_dml.export/1"
# How many frozen tensors the checksum covers: enough to tell two checkpoints apart.
CHECKSUM_TENSORS = 4


def run_checkpoint(run_dir: Path, which: str = "last") -> Path:
    """checkpoints/last.ckpt, the run's own best checkpoint, or an explicit file."""
    if which not in ("last", "best"):
        path = Path(which)
        if not path.is_file():
            raise UserError(
                f"checkpoint {which} does not exist; use --checkpoint last, best or a .ckpt path"
            )
        return path
    ckpt_dir = run_dir / "checkpoints"
    if which == "last":
        path = ckpt_dir / "last.ckpt"
        if not path.is_file():
            raise UserError(
                f"no last checkpoint in {ckpt_dir}; is {run_dir} a run folder of vpt_dml.run?"
            )
        return path
    return best_checkpoint(run_dir)


def best_checkpoint(run_dir: Path) -> Path:
    """The best checkpoint this run named: in its metrics.json, else in its last.ckpt's
    ModelCheckpoint state (a run killed before writing metrics.json). Never a name sort:
    a folder may hold best-epoch000.ckpt of an earlier run next to this run's -v1."""
    try:
        named = ((read_record(run_dir) or {}).get("best") or {}).get("checkpoint")
    except RecordUnreadable as e:
        raise UserError(f"{e.path} is not valid JSON; give --checkpoint PATH") from None
    last = run_dir / "checkpoints" / "last.ckpt"
    if not named and last.is_file():
        states = load_checkpoint(last, key="--checkpoint last").get("callbacks") or {}
        named = next(
            (
                s.get("best_model_path")
                for k, s in states.items()
                if k.startswith("ModelCheckpoint")
                and isinstance(s, dict)
                and s.get("best_model_path")
            ),
            None,
        )
    if not named:
        raise UserError(
            f"{run_dir} names no best checkpoint (metrics.json and last.ckpt hold none); "
            "use --checkpoint last or a .ckpt path"
        )
    # the run folder may have moved since: look for the named file inside it first
    for path in (run_dir / "checkpoints" / Path(named).name, Path(named)):
        if path.is_file():
            return path
    raise UserError(
        f"the best checkpoint this run names ({named}) is missing from {run_dir / 'checkpoints'}; "
        "use --checkpoint last or a .ckpt path"
    )


def structure_only(model_cfg: Mapping) -> dict:
    """The model config with its backbone weights switched off: same shapes, no download."""
    cfg = copy.deepcopy(dict(model_cfg))
    backbone = dict(cfg["backbone"])
    backbone.update(pretrained=False, weights=None)
    backbone.pop("synthetic_pretraining", None)
    cfg["backbone"] = backbone
    return cfg


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def fingerprint(model_cfg: Mapping, state: Mapping[str, torch.Tensor], tuned: set[str]) -> dict:
    """Backbone name + every tensor's name and shape + a checksum of a few frozen tensors."""
    shapes = {name: list(t.shape) for name, t in state.items()}
    frozen = sorted(name for name in state if name not in tuned)
    # spread over the network: first, last and evenly in between
    step = max(len(frozen) // CHECKSUM_TENSORS, 1)
    sample = frozen[::step][: CHECKSUM_TENSORS - 1] + frozen[-1:] if frozen else []
    return {
        "backbone": model_cfg["backbone"]["name"],
        "kwargs": dict(model_cfg["backbone"].get("kwargs") or {}),
        "shapes_sha256": hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest(),
        "frozen_checksum_tensors": sorted(set(sample)),
        "frozen_sha256": tensor_digest({n: state[n] for n in set(sample)}),
    }


def run_model(run_dir: Path, which: str = "last") -> tuple[dict, Path, dict, Embedder]:
    """(model config, checkpoint, image-branch state, the embedder built without weights)
    of a run folder; refuses a checkpoint that does not fit the run's model."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config_resolved.yaml"
    if not cfg_path.is_file():
        raise UserError(f"{cfg_path} is missing; give the run folder that vpt_dml.run wrote")
    cfg = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True)
    model_cfg = cfg["model"]
    ckpt_path = run_checkpoint(run_dir, which)
    # weights_only=True: a checkpoint from elsewhere cannot run code; anything else is refused
    ckpt = load_checkpoint(ckpt_path, key="--checkpoint")
    state = {
        k.removeprefix(IMAGE_BRANCH): v
        for k, v in ckpt["state_dict"].items()
        if k.startswith(IMAGE_BRANCH)
    }
    # requires_grad decides what was tuned; build the same structure without weights
    reference = build_embedder(structure_only(model_cfg))
    diffs = state_differences(reference.state_dict(), state)
    if diffs:
        raise UserError(
            f"{ckpt_path} does not match the model in {cfg_path}: "
            f"{describe_difference(diffs, 'the checkpoint')} (made with {made_with(ckpt)}); "
            "export the checkpoint of that same run"
        )
    return model_cfg, ckpt_path, state, reference


def export_run(run_dir: Path, out: Path, which: str = "last") -> dict:
    """Write OUT.safetensors from a run folder; returns a small report (sizes, counts)."""
    model_cfg, ckpt_path, state, reference = run_model(run_dir, which)
    tuned = {name for name, p in reference.named_parameters() if p.requires_grad}
    tensors = {name: state[name].contiguous() for name in sorted(tuned)}
    frozen = [] if rebuildable(model_cfg) else sorted(set(state) - tuned)
    tensors.update({name: state[name].contiguous() for name in frozen})
    image = data_config(reference.backbone.vit)
    metadata = {
        "format": FORMAT,
        "model": json.dumps(model_cfg),
        "backbone": model_cfg["backbone"]["name"],
        "fingerprint": json.dumps(fingerprint(model_cfg, state, tuned)),
        "preprocessing": json.dumps(image),
        "source": str(ckpt_path),
        "frozen_included": json.dumps(frozen),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return {
        "checkpoint": str(ckpt_path),
        "checkpoint_bytes": ckpt_path.stat().st_size,
        "export_bytes": out.stat().st_size,
        "tuned_tensors": len(tensors) - len(frozen),
        "tuned_parameters": sum(t.numel() for n, t in tensors.items() if n in tuned),
        "frozen_included": len(frozen),
    }


def export_run_onnx(
    run_dir: Path, out: Path, which: str = "last", exporter: str = "tracer"
) -> dict:
    """The run's inference-time embedder as ONNX, checked with onnxruntime (see
    serving/onnx_export.py); the checkpoint holds every weight, so no backbone download."""
    from vpt_dml.serving.onnx_export import export_onnx, peft_method

    model_cfg, ckpt_path, state, embedder = run_model(run_dir, which)
    embedder.load_state_dict(state)
    size = data_config(embedder.backbone.vit)["image_size"]
    report = export_onnx(embedder, size, out, peft_method(model_cfg), exporter)
    return {**report, "checkpoint": str(ckpt_path), "image_size": size}


def rebuildable(model_cfg: Mapping) -> bool:
    """Whether the frozen backbone can be rebuilt from the config (hub or weights file)."""
    backbone = model_cfg["backbone"]
    return bool(backbone.get("weights")) or bool(backbone.get("pretrained"))


class ExportedModel:
    """An exported embedder, ready for inference, plus its preprocessing settings."""

    def __init__(self, embedder: Embedder, preprocessing: dict, model_cfg: dict) -> None:
        self.embedder = embedder.eval()
        self.preprocessing = preprocessing
        self.model_cfg = model_cfg

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedder(images)


def read_export(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; give a file written by `python -m vpt_dml.export`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise UserError(
            f"{path} is not a safetensors file ({type(e).__name__}); give an export of vpt_dml"
        ) from None
    if meta.get("format") != FORMAT:
        raise UserError(
            f"{path} is not a vpt_dml export (format {meta.get('format')!r}, expected {FORMAT})"
        )
    return tensors, meta


def load_exported(
    path: Path, backbone_weights: str | None = None, pretrained: bool | None = None
) -> ExportedModel:
    """Rebuild the backbone by name, check it is the one the model was tuned on, load.

    `backbone_weights`: a local checkpoint of the backbone (instead of the hub);
    `pretrained`: override the config's choice (tests: False with a weights file).
    """
    tensors, meta = read_export(path)
    model_cfg = json.loads(meta["model"])
    expected = json.loads(meta["fingerprint"])
    frozen = set(json.loads(meta.get("frozen_included", "[]")))
    if frozen and backbone_weights is None:
        # the file holds the backbone itself: build the structure, load every tensor
        model_cfg = structure_only(model_cfg)
    else:
        tensors = {k: v for k, v in tensors.items() if k not in frozen}
    backbone = model_cfg["backbone"]
    if backbone_weights is not None:
        backbone.update(weights=str(backbone_weights), pretrained=True)
        backbone.pop("synthetic_pretraining", None)
    if pretrained is not None and not (frozen and backbone_weights is None):
        backbone["pretrained"] = pretrained
    embedder = build_embedder(model_cfg)
    if frozen and backbone_weights is None:
        embedder.load_state_dict(tensors, strict=False)
    state = embedder.state_dict()
    tuned = set(tensors) - frozen
    found = fingerprint(model_cfg, state, tuned)
    fix = "load it with the backbone it was tuned on (--backbone-weights PATH for a local copy)"
    if (
        found["backbone"] != expected["backbone"]
        or found["shapes_sha256"] != expected["shapes_sha256"]
    ):
        raise UserError(
            f"{path} was tuned on {expected['backbone']} {expected['kwargs']}, but the rebuilt backbone "
            f"is {found['backbone']} {found['kwargs']} with other shapes; {fix}"
        )
    if found["frozen_sha256"] != expected["frozen_sha256"]:
        raise UserError(
            f"the frozen weights of {found['backbone']} differ from those {path} was tuned on "
            f"(checksum mismatch); {fix}"
        )
    missing = tuned - set(state)
    if missing:
        raise UserError(
            f"{path} holds tensors the model lacks ({sorted(missing)[:3]}); re-export the run"
        )
    embedder.load_state_dict({k: v for k, v in tensors.items() if k in tuned}, strict=False)
    return ExportedModel(embedder, json.loads(meta["preprocessing"]), model_cfg)
