"""The nine released presets: compose to METHOD.md §3's numbers, and train a few steps
with the data swapped for `synthetic` and a tiny backbone."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_BACKBONE, TINY_DATA, TINY_TRAINER, compose_config
from omegaconf import OmegaConf
from tolerances import close

from vpt_dml.models.backbone import data_config
from vpt_dml.run import train
from vpt_dml.runs.config_schema import check_config
from vpt_dml.train import build_datamodule, build_module

# METHOD.md §3: bs, k, epochs, opt, lr, lr_proxy, wd, T_max, eta_min, P, Q, r, dropout, bank
OPTIMIZERS = {"sgd": "torch.optim.SGD", "adamw": "torch.optim.AdamW"}
# the reference's first evaluated epoch (its eval start), per preset
START_EPOCH = {
    "cub_deep_small": 5, "cub_deep": 30, "cars_deep_small": 35, "cars_deep": 40,
    "sop_deep_small": 30, "sop_deep": 30, "inshop_deep_small": 40, "inshop_deep": 20,
    "inat_deep": 5,
}  # fmt: skip
# fmt: off
TABLE = {
    "cub_deep_small"     : (64, 2, 15, "sgd", 0.005, 0.1, 1e-06, 50, 1e-08, (10, 12, 0), (3, 12, 0), 0.5, 0.0, False),
    "cub_deep"           : (64, 2, 60, "sgd", 0.001, 0.01, 1e-06, 100, 1e-07, (20, 12, 0), (5, 4, 5), 0.4, 0.0, False),
    "cars_deep_small"    : (64, 2, 50, "adamw", 0.0005, 0.01, 0, 50, 1e-06, (80, 11, 2), (50, 8, 2), 0.7, 0.0, False),
    "cars_deep"          : (64, 2, 60, "adamw", 0.0005, 0.01, 0, 50, 1e-06, (80, 10, 2), (50, 8, 2), 0.1, 0.0, False),
    "sop_deep_small"     : (32, 1, 120, "adamw", 0.0001, 0.05, 0.0001, 120, 5e-05, (90, 12, 0), (5, 12, 0), 0.2, 0.1, True),
    "sop_deep"           : (32, 1, 120, "adamw", 0.0001, 0.05, 0.0001, 120, 1e-07, (90, 12, 5), (5, 8, 0), 0.2, 0.5, True),
    "inshop_deep_small"  : (32, 1, 80, "adamw", 0.0001, 0.05, 1e-07, 100, 5e-06, (90, 12, 0), (80, 12, 0), 0.2, 0.1, True),
    "inshop_deep"        : (32, 1, 75, "adamw", 0.0001, 0.05, 0, 100, 1e-06, (90, 12, 0), (60, 12, 0), 0.3, 0.0, True),
    "inat_deep"          : (64, 1, 40, "adamw", 0.0001, 0.05, 0, 50, 1e-06, (90, 12, 5), (10, 12, 0), 0.2, 0.0, True),
}
# fmt: on


@pytest.mark.parametrize("preset", list(TABLE))
def test_preset_composes_to_the_released_config(preset, tmp_path):
    bs, k, epochs, opt, lr, lrp, wd, tmax, eta, P, Q, r, drop, bank = TABLE[preset]
    cfg = compose_config([], tmp_path, experiment=preset)
    small = preset.endswith("_small")
    assert cfg.data.name == preset.split("_")[0]
    assert cfg.model.backbone.name.startswith("vit_small" if small else "vit_base")
    assert cfg.model.backbone.name.endswith("augreg_in21k") and cfg.model.backbone.pretrained
    assert cfg.model.embed_dim == (384 if small else 512)
    assert (cfg.data.batch_size, cfg.data.samples_per_class) == (bs, k)
    assert cfg.trainer.max_epochs == epochs and cfg.trainer.precision == "16-mixed"
    o = cfg.optim
    assert (o.lr, o.lr_proxy, o.weight_decay, o.t_max, o.eta_min) == (lr, lrp, wd, tmax, eta)
    plain = OmegaConf.to_container(o, resolve=True)
    # the optimizer / scheduler objects are built from the flat keys
    assert plain["optimizer"]["_target_"] == OPTIMIZERS[opt]
    assert (plain["optimizer"]["lr"], plain["optimizer"]["weight_decay"]) == (lr, wd)
    assert (plain["scheduler"]["t_max"], plain["scheduler"]["eta_min"]) == (tmax, eta)
    if opt == "sgd":
        assert plain["optimizer"]["momentum"] == 0.9
    p, q = cfg.model.peft.prompts, cfg.model.proxy.class_prompts
    assert (p.num, p.depth, p.step) == P and (q.num, q.depth, q.step) == Q
    assert cfg.model.peft.bitfit and not cfg.model.peft.full
    assert cfg.model.proxy.kind == "semantic_gru" and cfg.model.proxy["update"] == "gru_relu"
    assert (cfg.model.proxy.bias_ratio, cfg.model.proxy.dropout) == (r, drop)
    assert cfg.model.proxy.class_prompt_store == ("host" if bank else "device")
    # the host bank counts Adam steps once per training step, as the reference
    assert cfg.model.proxy.class_prompt_step == ("global" if bank else "per_row")
    assert cfg.loss._target_ == "vpt_dml.losses.ProxyAnchorLoss"
    assert cfg.loss.positive_normalization == "all" and cfg.loss.proxy_range == "all"
    assert (cfg.loss.alpha, cfg.loss.delta) == (32.0, 0.1)
    assert cfg.eval.start_epoch == START_EPOCH[preset]
    assert cfg.data.fast_decode is False  # torchvision's plain pipeline, as the reference
    check_config(cfg)  # and nothing in it is unknown or contradictory


# the presets prompt 12 (or 8-11) layers: a tiny ViT 12 blocks deep keeps their depths valid
TINY_BACKBONE_12 = [
    o.replace("depth: 2,", "depth: 12,") if o.startswith("++model.backbone.kwargs") else o
    for o in TINY_BACKBONE
]


def recomputed_recall_at_1(cfg, state_dict: dict) -> float:
    """The test split's Recall@1 recomputed outside the run: the model rebuilt with the
    checkpoint's weights, the test images embedded here, a float64 brute-force k-NN."""
    from tests.unit.test_retrieval import brute_force

    dm = build_datamodule(cfg)
    splits = dm.load()
    module = build_module(cfg, splits.train.num_classes, (1,))
    module.load_state_dict(state_dict)
    module.eval()
    pre = data_config(module.embedder.backbone.vit)
    dm.set_preprocessing(pre["image_size"], pre["mean"], pre["std"])
    dm.setup("test")
    embs, labels = [], []
    with torch.no_grad():
        for images, y, _ in dm.test_dataloader():
            embs.append(module(images).double())
            labels.append(y)
    return brute_force(torch.cat(embs).numpy(), torch.cat(labels).numpy(), ks=(1,))["recall@1"]


def tiny_preset_overrides(preset: str) -> list[str]:
    k = TABLE[preset][1]
    # the tiny synthetic split has 4 training classes: 4 classes x k images a batch
    data = [o for o in TINY_DATA if not o.startswith(("data.samples_per_class", "data.batch_size"))]
    # prompt counts and depths stay the preset's own
    return (
        TINY_BACKBONE_12
        + data
        + TINY_TRAINER
        + [
            f"data.samples_per_class={k}",
            f"data.batch_size={4 * k}",
            "+trainer.limit_train_batches=2",
            "eval_before_training=false",
        ]
    )


@pytest.mark.parametrize("preset", list(TABLE))
def test_preset_trains_a_few_steps_on_tiny_data(preset, tmp_path):
    cfg = compose_config(tiny_preset_overrides(preset), tmp_path, experiment=preset)
    assert cfg.data.name == "synthetic" and cfg.trainer.precision == "32-true"
    metrics = train(cfg)
    result = json.loads((tmp_path / "run" / "metrics.json").read_text())
    params = result["provenance"]["parameters"]
    assert params["class_prompts"]["trainable"] > 0 and params["gru"]["trainable"] > 0
    assert result["provenance"]["global_step"] == 2
    # H moved off its initial value and travels in the checkpoint
    ckpt = next((tmp_path / "run").rglob("*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    memory = state["proxies.memory"]
    torch.testing.assert_close(memory.norm(dim=-1), torch.ones(len(memory)), **close(torch.float32))
    fresh = build_module(cfg, num_classes=len(memory), eval_ks=(1,))
    assert not torch.equal(fresh.proxies.memory, memory)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.proxies.memory, memory)
    # the reported Recall@1 is that of the trained weights (one epoch: the checkpoint's)
    assert metrics["recall@1"] == pytest.approx(recomputed_recall_at_1(cfg, state), abs=1e-6)


def test_cars_vit_b_cosine_rises_after_t_max(tmp_path):
    cfg = compose_config(
        TINY_BACKBONE_12 + ["model.proxy.class_prompts.num=1"], tmp_path, "cars_deep"
    )
    module = build_module(cfg, num_classes=3, eval_ks=(1,))
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(60):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert [g["name"] for g in opt.param_groups] == ["main", "proxy"]
    assert lrs[0] == [5e-4, 1e-2]
    assert lrs[50][0] == pytest.approx(1e-6)  # float64; eta_min at T_max ...
    assert lrs[59][0] > 10 * lrs[50][0]  # ... then it rises again, as released
    assert lrs[59][1] > lrs[50][1]
