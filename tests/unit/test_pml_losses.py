"""pytorch-metric-learning losses through the adapter (vpt_dml/losses/pml.py).

- the adapter's loss (and, with a miner, its pairs) equals PML called directly on the
  same embeddings with the same parameters;
- under autocast the loss runs in float32 and the class weights stay float32;
- tiny runs through the real pipeline for every preset on two PEFT methods: finished,
  the loss's own parameters train in their own optimizer group at loss.lr, frozen
  backbone weights do not move;
- a PML loss with semantic proxies, an unknown class or a refused argument: one line.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config, tiny_overrides
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")

from vpt_dml.errors import UserError  # noqa: E402
from vpt_dml.losses.pml import PMLLoss  # noqa: E402
from vpt_dml.module import from_config  # noqa: E402
from vpt_dml.run import train  # noqa: E402

PRESETS = ["pml_multisimilarity", "pml_arcface", "pml_softtriple", "pml_circle"]
OWN_PARAMETERS = {"pml_arcface", "pml_softtriple"}
CLASSES, DIM = 6, 16


def _loss_node(preset: str, tmp_path: Path) -> dict:
    cfg = compose_config(tiny_overrides(f"loss={preset}"), tmp_path)
    return OmegaConf.to_container(cfg.loss, resolve=True)


def _batch(dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(CLASSES).repeat_interleave(3)
    centres = torch.randn(CLASSES, DIM, generator=gen, dtype=torch.float64)
    emb = centres[labels] + 0.8 * torch.randn(len(labels), DIM, generator=gen, dtype=torch.float64)
    return F.normalize(emb, dim=1).to(dtype), labels


def _direct(node: dict, adapter: PMLLoss):
    """PML's own objects, built from the preset's settings, with the adapter's parameters."""
    cls = getattr(pml_losses, node["name"])
    kwargs = dict(node["kwargs"])
    if node["name"] in ("ArcFaceLoss", "SoftTripleLoss"):
        kwargs.update(num_classes=CLASSES, embedding_size=DIM)
    loss = cls(**kwargs)
    loss.load_state_dict(adapter.loss.state_dict())
    miner = None
    if node.get("miner"):
        miner = getattr(pml_miners, node["miner"]["name"])(**node["miner"]["kwargs"])
    return loss, miner


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_adapter_equals_pml_called_directly(preset, dtype, tmp_path):
    node = _loss_node(preset, tmp_path)
    adapter = from_config(node, "loss")
    adapter.bind(CLASSES, DIM)
    adapter.to(dtype)  # a 64-true run holds float64 parameters
    loss, miner = _direct(node, adapter)
    loss.to(dtype)
    emb, labels = _batch(dtype)
    ours_emb = emb.clone().requires_grad_(True)
    theirs_emb = emb.clone().requires_grad_(True)
    ours = adapter(ours_emb, labels, proxies=None)
    pairs = miner(theirs_emb, labels) if miner is not None else None
    theirs = loss(theirs_emb, labels, pairs)
    assert ours.dtype == dtype and float(theirs) > 0
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=0)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_emb.grad, theirs_emb.grad, rtol=rtol, atol=rtol * 1e-3)
    for (name, p), q in zip(adapter.loss.named_parameters(), loss.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=rtol * 1e-3, msg=name)


@pytest.mark.parametrize("preset", ["pml_arcface", "pml_softtriple"])
def test_autocast_runs_the_loss_in_float32(preset, tmp_path):
    """Under bf16 autocast the embeddings arrive in bfloat16: the loss is the float32 loss
    of those values, and PML's in-place cast leaves the class weights float32."""
    adapter = from_config(_loss_node(preset, tmp_path), "loss")
    adapter.bind(CLASSES, DIM)
    emb, labels = _batch(torch.float32)
    low = emb.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = adapter(low, labels)
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
    assert mixed.dtype == torch.float32
    reference = copy.deepcopy(adapter.loss)(low.float(), labels)  # PML itself, no autocast
    torch.testing.assert_close(mixed, reference, rtol=1e-5, atol=1e-6)


def test_loss_parameters_get_their_own_group(tmp_path):
    node = _loss_node("pml_arcface", tmp_path)
    adapter = from_config(node, "loss")
    assert adapter.param_group() is None or not list(adapter.parameters())  # not built yet
    adapter.bind(CLASSES, DIM)
    group = adapter.param_group()
    assert group["name"] == "loss" and group["lr"] == node["lr"]
    assert [p.shape for p in group["params"]] == [torch.Size([DIM, CLASSES])]


@pytest.mark.parametrize(
    "node, words",
    [
        ({"name": "NoSuchLoss"}, "not a pytorch_metric_learning.losses class"),
        ({"name": "CircleLoss", "kwargs": {"mm": 0.4}}, "CircleLoss refused"),
        ({"name": "ArcFaceLoss", "kwargs": {"num_classes": 3}}, "set by the run"),
        ({"name": "CircleLoss", "miner": {"name": "NoMiner"}}, "miners class"),
    ],
)
def test_bad_settings_are_one_line(node, words):
    with pytest.raises(UserError, match=words) as e:
        adapter = PMLLoss(**node)
        adapter.bind(CLASSES, DIM)
    assert "\n" not in str(e.value)


# -- tiny runs through the real pipeline ---------------------------------------------------
SNAPSHOTS: dict[str, dict] = {}


class Snapshot(L.Callback):
    """Parameters and optimizer groups at the start and end of fit (test instrument)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def on_fit_start(self, trainer, pl_module) -> None:
        SNAPSHOTS[self.key] = {
            "start": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "trainable": {n for n, p in pl_module.named_parameters() if p.requires_grad},
            "groups": [
                (g.get("name"), g["lr"], len(g["params"]))
                for g in trainer.optimizers[0].param_groups
            ],
        }

    def on_fit_end(self, trainer, pl_module) -> None:
        SNAPSHOTS[self.key]["end"] = {
            n: p.detach().clone() for n, p in pl_module.named_parameters()
        }


@pytest.mark.parametrize("peft", ["lora", "bitfit"])
@pytest.mark.parametrize("preset", PRESETS)
def test_tiny_run_trains_the_loss_and_not_the_backbone(preset, peft, tmp_path):
    key = f"{preset}-{peft}"
    cfg = compose_config(
        tiny_overrides(
            f"loss={preset}",
            f"model/peft={peft}",
            "optim.lr_proxy=0.05",
            "eval_before_training=false",
            f"+callbacks.snapshot._target_={__name__}.Snapshot",
            f"+callbacks.snapshot.key={key}",
        ),
        tmp_path,
    )
    HydraConfig.instance().set_config(cfg)
    metrics = train(cfg)
    record = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert record["status"] == "finished" and 0.0 <= metrics["recall@1"] <= 1.0
    loss_name = OmegaConf.select(cfg, "loss.name")
    assert record["method"]["label"] == f"{peft} / {loss_name}"  # not "learned" proxies

    snap = SNAPSHOTS.pop(key)
    start, end, trainable = snap["start"], snap["end"], snap["trainable"]
    moved = {n for n in start if not torch.equal(start[n], end[n])}
    own = {n for n in start if n.startswith("criterion.")}
    assert bool(own) == (preset in OWN_PARAMETERS) and own <= trainable
    assert own <= moved, "the loss's own parameters did not train"
    frozen = set(start) - trainable
    assert frozen and not (frozen & moved), f"frozen weights moved: {sorted(frozen & moved)[:3]}"
    assert any(n.startswith("embedder.backbone.vit.") and n.endswith(".weight") for n in frozen)
    assert not {n for n in trainable if n.startswith("proxies.")}, "unread proxies trained"
    assert {n for n in trainable if n.startswith("embedder.")} <= moved
    groups = {name: (lr, n) for name, lr, n in snap["groups"]}
    if preset in OWN_PARAMETERS:
        assert groups["loss"] == (0.05, len(own))
    else:
        assert "loss" not in groups
    assert "proxy" not in groups
    counts = record["provenance"]["parameters"]
    if preset in OWN_PARAMETERS:  # counted as training-only, not as the exported model
        n_own = sum(start[n].numel() for n in own)
        assert counts["loss"]["trainable"] == n_own
        assert counts["training_only"]["trainable"] == n_own


def test_semantic_proxies_refused(tmp_path):
    cfg = compose_config(
        tiny_overrides("loss=pml_arcface", "model/proxy=semantic_gru_demo"), tmp_path
    )
    HydraConfig.instance().set_config(cfg)
    with pytest.raises(UserError, match="add model/proxy=learned") as e:
        train(cfg)
    assert "\n" not in str(e.value)


def _run(tmp_path: Path, name: str, *extra: str) -> dict:
    cfg = compose_config(tiny_overrides("loss=pml_arcface", "model/peft=lora", *extra), tmp_path)
    with open_dict(cfg):  # one generated dataset, one folder per run
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.paths.output_dir = cfg.hydra.runtime.output_dir = str(tmp_path / name)
    HydraConfig.instance().set_config(cfg)
    train(cfg)
    return torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)


def test_resume_with_a_pml_loss_equals_a_straight_run(tmp_path):
    """The loss's own weights and their optimizer group travel in the checkpoint."""
    straight = _run(tmp_path, "straight", "trainer.max_epochs=2")
    first = _run(tmp_path, "first", "trainer.max_epochs=1")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    resumed = _run(tmp_path, "resumed", "trainer.max_epochs=2", f"ckpt_path={last}")
    weights = "criterion.loss.W"
    assert not torch.equal(first["state_dict"][weights], straight["state_dict"][weights])
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    groups = [g.get("name") for g in resumed["optimizer_states"][0]["param_groups"]]
    assert groups[-1] == "loss"
    for a, b in zip(straight["optimizer_states"], resumed["optimizer_states"]):
        for pid, state in a["state"].items():
            for name, t in state.items():
                torch.testing.assert_close(b["state"][pid][name], t, rtol=0, atol=1e-6)
