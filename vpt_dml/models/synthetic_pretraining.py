"""Supervised pretraining of the demo's tiny ViT on generated "source" classes.

A frozen *random* ViT gives prompts and BitFit nothing to steer, so the demo would
show no learning. Real runs start from ImageNet-21k weights; the demo stands in for that
with a short supervised pretraining on generated classes that are disjoint from the demo
dataset's train and test classes. The result is written as an ordinary checkpoint file
and loaded through `model.backbone.weights`, the same path a downloaded checkpoint takes.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vpt_dml.data.synthetic import source_images
from vpt_dml.errors import UserError

log = logging.getLogger(__name__)


def pretrain_backbone(
    name: str,
    kwargs: dict,
    out_path: str | Path,
    num_classes: int = 96,
    images_per_class: int = 24,
    epochs: int = 12,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
) -> Path:
    """Train `name(**kwargs)` to classify generated source classes; save its weights."""
    out_path = Path(out_path).expanduser()
    spec = json.dumps(
        {
            "name": name,
            "kwargs": kwargs,
            "num_classes": num_classes,
            "images_per_class": images_per_class,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
        },
        sort_keys=True,
    )
    if out_path.is_file():
        check_made_for(out_path, spec)
        return out_path
    if not name.startswith("vit_") or int(kwargs.get("depth", 12)) > 6:
        raise UserError(
            f"model.backbone.synthetic_pretraining is meant for the demo's tiny ViT, not {name}; "
            "remove it and set model.backbone.pretrained=true or model.backbone.weights=PATH"
        )
    size = int(kwargs.get("img_size", 224))
    log.info(
        "pretraining the demo backbone on %d generated source classes (once, cached at %s)",
        num_classes,
        out_path,
    )
    x, y = source_images(num_classes, images_per_class, size, seed)
    images = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
    labels = torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        # coarse classes (shape x period); ids of shapes absent from the sample stay unused
        model = timm.create_model(
            name, pretrained=False, num_classes=int(labels.max()) + 1, **kwargs
        )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * (len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        correct = 0
        for i in range(len(images) // batch_size):
            idx = order[i * batch_size : (i + 1) * batch_size]
            batch = images[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5  # cheap augmentation
            batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
            logits = model(batch)
            loss = F.cross_entropy(logits, labels[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == labels[idx]).sum())
        seen = len(idx) * (i + 1)
        log.info(
            "source epoch %d/%d: loss %.3f, train acc %.2f",
            epoch + 1,
            epochs,
            loss.item(),
            correct / seen,
        )
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, suffix=".tmp")
    os.close(fd)
    save_file(
        state,
        tmp,
        metadata={
            "source": "vpt_dml synthetic pretraining",
            "classes": str(num_classes),
            "spec": spec,  # what it was made for: a cached file is reused only for that
        },
    )
    os.replace(tmp, out_path)  # atomic: concurrent ranks never read half a file
    return out_path


def check_made_for(path: Path, spec: str) -> None:
    """A cached file is reused only for the model and schedule it was made for: the demo's
    file name is fixed, so a run with other kwargs must not leave (or load) its weights
    there under the demo's name. Files written before the spec was recorded pass."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            made = (f.metadata() or {}).get("spec")
    except Exception:  # noqa: BLE001 - not ours to judge: the strict loader reports it
        return
    if made is not None and json.loads(made) != json.loads(spec):
        raise UserError(
            f"{path} was pretrained for {_brief(made)}, not for this run's {_brief(spec)}; "
            "set model.backbone.synthetic_pretraining.output to another file (or delete this one)"
        )


def _brief(spec: str) -> str:
    d = json.loads(spec)
    kwargs = ", ".join(f"{k}={v}" for k, v in sorted(d.get("kwargs", {}).items()))
    rest = ", ".join(f"{k}={d[k]}" for k in ("num_classes", "images_per_class", "epochs") if k in d)
    return f"{d.get('name')}({kwargs}) [{rest}]"
