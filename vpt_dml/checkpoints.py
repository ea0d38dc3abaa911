"""Safe checkpoint loading: weights_only=True, one-line errors, a check against the model.

A `.ckpt` is a pickle. Loading it with `weights_only=False` can run any code its author put
in; `weights_only=True` rebuilds only tensors and plain values (dicts, lists, numbers,
strings), which is all a Lightning checkpoint of vpt_dml holds. Anything else is refused,
and every way a file can be wrong (missing, truncated, not a checkpoint, made for another
model) ends in a `UserError` naming the file and the fix.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from vpt_dml.errors import UserError

# No allow-list beyond torch's own: Lightning 2.x checkpoints of VPTDMLModule hold only
# tensors, containers, numbers and strings (hyper-parameters as plain dicts, ExactResume's RNG
# state as tensors and tuples); tests/test_run_errors.py checks that none needs more.
ZIP_MAGIC = b"PK\x03\x04"
# the callback that records which run wrote a checkpoint (vpt_dml.runs.callbacks.exact_resume.ExactResume)
RUN_INFO_CALLBACK = "ExactResume"


def load_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict:
    """The checkpoint at `path`, loaded with weights_only=True (memory-mapped: cheap to check).

    `key` names where the path came from (a config key or a CLI option) in the messages.
    """
    path = Path(path).expanduser()
    name = f"{key}={path}"
    if not path.exists():
        raise UserError(
            f"{name} does not exist; give a checkpoint written by vpt_dml.run "
            "(<run dir>/checkpoints/last.ckpt)"
        )
    if path.is_dir():
        raise UserError(
            f"{name} is a folder; give the checkpoint file, e.g. {path}/checkpoints/last.ckpt"
        )
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(len(ZIP_MAGIC))
    is_zip = head == ZIP_MAGIC
    if size == 0 or (is_zip and not zipfile.is_zipfile(path)):
        raise UserError(
            f"{name} is truncated ({size:,} bytes, the end of the file is missing): an "
            "interrupted save or copy; copy it again or give an earlier checkpoint"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols it then refuses
            # mmap needs torch's zip format; the legacy format is read whole
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        # torch's zip holds a pickle; a bare pickle starts with its PROTO opcode
        is_pickle = is_zip or head[:1] == b"\x80"
        if not is_pickle or "weights only load failed" not in str(e).lower():
            raise UserError(f"{name} is not a PyTorch checkpoint{_hint(path)}") from None
        raise UserError(
            f"{name} was refused: {_refusal(str(e))}, and a vpt_dml checkpoint holds only tensors "
            "and plain values; it was not loaded (unpickling a file of unknown origin can run code)"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError) as e:
        if is_zip:
            raise UserError(
                f"{name} is corrupt or not a PyTorch checkpoint ({_first_line(e)}); "
                "copy it again or give an earlier checkpoint"
            ) from None
        raise UserError(f"{name} is not a PyTorch checkpoint{_hint(path)}") from None
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        bare = (
            isinstance(ckpt, Mapping)
            and ckpt
            and all(isinstance(v, torch.Tensor) for v in ckpt.values())
        )
        what = "bare weights (a state dict)" if bare else "no state_dict"
        raise UserError(
            f"{name} is not a training checkpoint of vpt_dml.run ({what}); give "
            "<run dir>/checkpoints/last.ckpt (backbone weights go to model.backbone.weights)"
        )
    return dict(ckpt)


def _refusal(message: str) -> str:
    """Why torch's weights_only unpickler refused a file, in a few words."""
    refused = sorted(set(re.findall(r"GLOBAL ([\w.]+)", message)))
    if refused:
        return (
            f"it holds Python objects ({', '.join(refused)}) that safe loading "
            "(weights_only=True) does not rebuild"
        )
    reason = re.search(r"WeightsUnpickler error:\s*(.+)", message)
    detail = f" ({reason.group(1).strip()})" if reason else ""
    return f"it is a pickle that safe loading (weights_only=True) cannot read{detail}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _hint(path: Path) -> str:
    if path.suffix == ".safetensors":
        return " (a safetensors file holds bare weights: backbone weights go to model.backbone.weights)"
    return "; give <run dir>/checkpoints/last.ckpt of a vpt_dml.run"


def made_with(ckpt: Mapping, overrides: list[str] | None = None) -> str:
    """Which preset / settings wrote the checkpoint, from what it saved about its run.

    `overrides`: this run's; then only the checkpoint's overrides that differ are named.
    """
    run = (ckpt.get("callbacks") or {}).get(RUN_INFO_CALLBACK, {}).get("run") or {}
    parts = []
    if run.get("task_name"):
        parts.append(f"task_name={run['task_name']}")

    def relevant(items) -> list[str]:
        return [o for o in items or [] if not o.startswith(("hydra.", "ckpt_path", "overwrite"))]

    theirs = relevant(run.get("overrides"))
    if overrides is not None and "overrides" in run:
        ours = relevant(overrides)
        only_theirs = [o for o in theirs if o not in ours]
        only_ours = [o for o in ours if o not in theirs]
        if only_theirs:
            parts.append(f"overrides this run lacks: {_few(only_theirs)}")
        if only_ours:
            parts.append(f"without this run's {_few(only_ours)}")
    elif theirs:
        parts.append(f"overrides: {_few(theirs)}")
    hp = ckpt.get("hyper_parameters") or {}
    model = hp.get("model") or {}
    settings = [
        f"backbone {(model.get('backbone') or {}).get('name')}" if model.get("backbone") else "",
        f"peft {(model.get('peft') or {}).get('name')}" if model.get("peft") else "",
        f"proxy {(model.get('proxy') or {}).get('kind')}" if model.get("proxy") else "",
        f"{hp['num_classes']} classes" if "num_classes" in hp else "",
        f"embed_dim {model['embed_dim']}" if "embed_dim" in model else "",
    ]
    settings = [s for s in settings if s]
    if settings:
        parts.append(", ".join(settings))
    return "; ".join(parts) if parts else "unknown settings (no vpt_dml hyper-parameters saved)"


def _few(items: list[str], n: int = 4) -> str:
    return " ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _shape(t) -> str:
    return "absent" if t is None else str(list(t))


def tensor_leaves(state: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a state dict by dotted name, also those inside a module's extra
    state (the host class-prompt bank keeps its tables in `..._extra_state`, a dict)."""
    out: dict[str, torch.Tensor] = {}
    items = state.items() if isinstance(state, Mapping) else enumerate(state)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, (Mapping, list, tuple)):
            out.update(tensor_leaves(value, f"{name}."))
    return out


def state_differences(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]
) -> list[tuple[str, tuple | None, tuple | None]]:
    """(name, shape in `found`, shape in `expected`) of every tensor that differs, model order."""
    expected, found = tensor_leaves(expected), tensor_leaves(found)

    def optional(name: str) -> bool:  # extra state grows lazily (optimizer moments at step 1)
        return "_extra_state." in name

    diffs = []
    for name, t in expected.items():
        if name not in found:
            if not optional(name):
                diffs.append((name, None, tuple(t.shape)))
        elif tuple(found[name].shape) != tuple(t.shape):
            diffs.append((name, tuple(found[name].shape), tuple(t.shape)))
    diffs += [
        (name, tuple(t.shape), None)
        for name, t in found.items()
        if name not in expected and not optional(name)
    ]
    return diffs


def describe_difference(diffs: list, where: str = "the checkpoint") -> str:
    name, found, expected = diffs[0]
    more = f" ({len(diffs)} tensors differ)" if len(diffs) > 1 else ""
    return f"{name} is {_shape(found)} in {where} but {_shape(expected)} in this run's model{more}"


def check_resumable(
    ckpt: Mapping, module: torch.nn.Module, path: str | Path, overrides: list[str] | None = None
) -> None:
    """Refuse, in one line, a checkpoint that the built module cannot resume from.

    `overrides`: this run's command-line overrides (to name how the checkpoint's differ).
    """
    name = f"ckpt_path={path}"
    diffs = state_differences(module.state_dict(), ckpt["state_dict"])
    if diffs:
        raise UserError(
            f"{name} was made for another model: {describe_difference(diffs)}; it was made with "
            f"{made_with(ckpt, overrides)}: resume with the same +experiment and overrides, "
            "or drop ckpt_path"
        )
    if "optimizer_states" not in ckpt or "loops" not in ckpt:
        raise UserError(
            f"{name} holds model weights only (no optimizer or loop state) and cannot resume "
            "training; give <run dir>/checkpoints/last.ckpt"
        )
