"""A resume continues the same run: its composed config must equal the checkpoint's.

Every checkpoint carries its run's resolved config (ExactResume's `run.config`). When
`ckpt_path` is given, `plan_resume` compares it with this run's config, key by key, and
refuses any difference in one line naming the keys and both values, before anything is
built. Without it a changed `optim.lr` is silently overridden by the optimizer state the
checkpoint restores, while a changed `data.batch_size` or `loss` takes effect mid-run: in
both cases the recorded config says something else than what trained.

Not compared (they do not change the numbers, or the checkpoint overrides them anyway):
NEUTRAL below. Always allowed: `trainer.max_epochs` (how far to continue). Any other key
changed on purpose goes in `resume_overrides=[key, ...]` (a key, or a node such as `eval`);
the new value is applied and metrics.json records it under `resume.changed` with the first
epoch it applied to. Keys a resume cannot apply (RESTORED: the checkpoint's optimizer,
scheduler and RNG states win) are refused even there.

A checkpoint written before configs were stored (no `run.config`) is resumed with one
warning (also in metrics.json `warnings`): its settings cannot be compared.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vpt_dml.checkpoints import RUN_INFO_CALLBACK
from vpt_dml.distributed import is_global_zero
from vpt_dml.errors import UserError
from vpt_dml.runs.provenance import cfg_without_hydra

# Keys (or nodes) left out of the comparison, with why.
NEUTRAL = {
    # where things are, not what is computed
    "paths": "folders",
    "ckpt_path": "the checkpoint itself",
    "overwrite": "run-folder handling",
    "debug": "error display",
    "resume_overrides": "this list",
    "task_name": "a name",
    "tags": "labels",
    "trainer.default_root_dir": "a folder",
    "data.root": "a folder (the dataset is data.name and its settings)",
    # loggers and callbacks observe and save (csv, W&B, checkpoints, images, progress, cost)
    "logger": "logging only",
    "callbacks": "observers (checkpoints, images, progress, cost)",
    "trainer.enable_progress_bar": "display",
    "trainer.enable_model_summary": "display",
    # on resume the checkpoint's own evaluation before training is kept, not repeated
    "eval_before_training": "not repeated on resume",
    # where the backbone's initial weights came from: the checkpoint holds every tensor
    "model.backbone.weights": "initial weights (the checkpoint holds them)",
    "model.backbone.pretrained": "initial weights (the checkpoint holds them)",
    "model.backbone.synthetic_pretraining": "initial weights (the checkpoint holds them)",
    # start-up checks of the dataset files
    "data.check_files": "a start-up check",
    "data.strict_counts": "a start-up check",
}
ALWAYS_ALLOWED = ("trainer.max_epochs",)
# restored from the checkpoint: a new value would be recorded but not used
RESTORED = {
    "optim": "the optimizer and scheduler state in the checkpoint set the learning rates, "
    "weight decay and schedule",
    "seed": "the checkpoint restores its RNG states and the sampler's seed",
    "data.seed": "the checkpoint restores its RNG states and the sampler's seed",
}
# keys a newer vpt_dml added to the same settings (model.proxy's factory, named by `kind`
# before): absent in an older checkpoint's config, not a change
ADDED_LATER = {"model.proxy._target_", "model.proxy._partial_"}
SHOWN = 6  # differing keys named in the error before "(+N more)"


@dataclass
class ResumePlan:
    """What a resume continues from and what it changes (for metrics.json and checkpoints)."""

    source: str
    completed_epochs: int
    changed: list[dict] = field(default_factory=list)  # earlier resumes' changes, then this one's
    compared: bool = True  # False: an old checkpoint without a stored config

    def record(self) -> dict:
        return {"from": self.source, "changed": list(self.changed)}


def run_config(cfg: DictConfig) -> dict:
    """The resolved config a checkpoint stores (the `hydra` node left out)."""
    return OmegaConf.to_container(cfg_without_hydra(cfg), resolve=True)


def stored_run(ckpt: Mapping) -> dict:
    return dict((ckpt.get("callbacks") or {}).get(RUN_INFO_CALLBACK, {}).get("run") or {})


def completed_epochs(ckpt: Mapping) -> int:
    """Epochs the checkpoint has finished (an epoch-end checkpoint is saved at index E)."""
    mid = bool((ckpt.get("callbacks") or {}).get(RUN_INFO_CALLBACK, {}).get("mid_epoch"))
    return int(ckpt.get("epoch", -1)) + (0 if mid else 1)


def flatten(node, prefix: str = "") -> dict:
    """Dotted key -> leaf value (lists are leaves)."""
    if isinstance(node, Mapping) and node:
        out = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def _under(key: str, nodes) -> str | None:
    return next((n for n in nodes if key == n or key.startswith(n + ".")), None)


def _show(value) -> str:
    if value is _ABSENT:
        return "absent"
    if isinstance(value, str):
        return value
    return json.dumps(value)


_ABSENT = object()


def differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, value in the checkpoint, value now) of every compared leaf that differs."""
    old, new = flatten(saved), flatten(current)
    out = []
    for key in sorted(set(old) | set(new)):
        if _under(key, NEUTRAL):
            continue
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a is _ABSENT and key in ADDED_LATER:
            continue  # a checkpoint from before the key existed: `kind` still names it
        # 1 and 1.0 are one value; a bool is not a number here
        same = (
            a == b
            and type(a) is type(b)
            or (
                isinstance(a, (int, float))
                and isinstance(b, (int, float))
                and not isinstance(a, bool)
                and not isinstance(b, bool)
                and a == b
            )
        )
        if not same:
            out.append((key, a, b))
    return out


def allowed_keys(cfg: DictConfig, saved: dict) -> list[str]:
    """`resume_overrides` checked: each names a key (or node) of either config and is one a
    resume can apply."""
    raw = cfg.get("resume_overrides") or []
    if isinstance(raw, str):
        raw = [raw]
    keys = [str(k) for k in raw]
    known = set(flatten(saved)) | set(flatten(run_config_plain(cfg)))
    for key in keys:
        if not any(k == key or k.startswith(key + ".") for k in known):
            raise UserError(
                f"resume_overrides names {key}, which is no key of this run's config nor the "
                "checkpoint's; give full dotted keys, e.g. resume_overrides=[data.num_workers]"
            )
        restored = _under(key, RESTORED)
        if restored:
            raise UserError(
                f"resume_overrides=[{key}]: {key} cannot change on resume, {RESTORED[restored]}; "
                f"start a new run with the new {key} instead"
            )
    return [*ALWAYS_ALLOWED, *keys]


def run_config_plain(cfg: DictConfig) -> dict:
    try:
        return run_config(cfg)
    except Exception:  # noqa: BLE001 - a key needing a live Hydra job: compare the rest
        return OmegaConf.to_container(cfg_without_hydra(cfg), resolve=False)


def plan_resume(ckpt: Mapping, cfg: DictConfig, path: str | Path) -> ResumePlan:
    """Refuse (one line) a resume whose config differs from the checkpoint's, or that would
    train nothing; returns what it continues and what it changes."""
    name = f"ckpt_path={path}"
    run = stored_run(ckpt)
    done = completed_epochs(ckpt)
    plan = ResumePlan(str(path), done, changed=list(run.get("changed") or []))
    max_epochs = cfg.trainer.get("max_epochs")
    if isinstance(max_epochs, int) and 0 <= max_epochs < done:
        raise UserError(
            f"{name} holds {done} completed epoch(s) but trainer.max_epochs={max_epochs}: a resume "
            f"only trains on; give trainer.max_epochs>={done} (={done} re-runs the final test "
            "only), or start a new run"
        )
    saved = run.get("config")
    if not isinstance(saved, Mapping):
        plan.compared = False
        return plan
    current = run_config_plain(cfg)
    allowed = allowed_keys(cfg, dict(saved))
    diffs = differences(dict(saved), current)
    refused = [d for d in diffs if not _under(d[0], allowed)]
    if refused:
        shown = "; ".join(
            f"{k}={_show(new)} here but {_show(old)} in the checkpoint"
            for k, old, new in refused[:SHOWN]
        )
        more = f" (+{len(refused) - SHOWN} more)" if len(refused) > SHOWN else ""
        raise UserError(
            f"{name} was written with other settings: {shown}{more}; a resume continues the same "
            "run: drop those overrides (or use the checkpoint's values), or list a key you change "
            "on purpose in resume_overrides=[KEY,...] (not optim.* or seed: the checkpoint's "
            "optimizer and RNG state would override them)"
        )
    plan.changed += [
        {
            "key": k,
            "from": None if old is _ABSENT else old,
            "to": None if new is _ABSENT else new,
            "at_epoch": done,
        }  # fmt: skip
        for k, old, new in diffs
    ]
    return plan


def warn_uncompared(plan: ResumePlan) -> str:
    """The warning for a checkpoint without a stored config (printed once, rank zero)."""
    text = (
        f"ckpt_path={plan.source} stores no run config (written by an older vpt_dml): its "
        "settings were not compared with this run's; resume with the overrides it was made with"
    )
    if is_global_zero():
        print(f"warning: {text}", file=sys.stderr)
    return text


def trim_csv_history(path: Path, global_step: int) -> int:
    """Drop the rows logged after the checkpoint (the interrupted epoch's partial rows, an
    earlier final test): the resumed run logs them again. Returns how many were dropped.

    The evaluation before training (its `before/...` row) is kept: a resume does not repeat it.
    """
    if not path.is_file() or not is_global_zero():
        return 0
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    if "step" not in header:
        return 0

    def keep(row: dict) -> bool:
        if any(v not in ("", None) for k, v in row.items() if k and k.startswith("before/")):
            return True
        try:
            return int(float(row["step"])) < global_step
        except (TypeError, ValueError):
            return True

    kept = [r for r in rows if keep(r)]
    if len(kept) == len(rows):
        return 0
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)  # as Lightning writes it
        writer.writeheader()
        writer.writerows(kept)
    os.replace(tmp, path)
    return len(rows) - len(kept)
