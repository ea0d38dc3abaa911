"""A run that names something other than the demo inherits none of the demo (issue 28, 1).

The demo's backbone option (vit_tiny_demo) holds kwargs (64 px, width 96, depth 4) and a
weights file that describe one model. `model.backbone.name=X` with that option used to
build the demo's ViT under the name X and record X in metrics.json. Now:
- the demo's option files, swept against a non-demo backbone (model/backbone=timm), data
  set and optimiser: nothing of the demo reaches the composed config or the built model;
- `model.backbone.name=X` with an option whose settings describe another model is refused
  in one line naming model/backbone=timm;
- metrics.json records the architecture read off the built model;
- Hydra merges a dict override into kwargs: `~kwargs +kwargs={...}` replaces them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
from conftest import CONF, compose_config, resolved, tiny_overrides
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from vpt_dml.errors import UserError
from vpt_dml.models.backbone import built_architecture, built_report, create_backbone
from vpt_dml.models.build import build_embedder, check_backbone_option
from vpt_dml.runs.config_schema import check_config

# the demo's option files: what +experiment=demo (= the default run) selects per group
DEMO = {
    "model/backbone": "vit_tiny_demo",
    "model/peft": "vptsp_demo",
    "model/proxy": "semantic_gru_demo",
    "loss": "proxy_anchor",
    "optim": "adamw_demo",
    "data": "synthetic",
}
NODE = {g: g.replace("/", ".") for g in DEMO}
# the non-demo run it is swept against: a timm ViT by name, CUB, SGD
OTHER_BACKBONE = [
    "model/backbone=timm",
    "model.backbone.name=vit_small_patch16_224",
    "model.backbone.pretrained=false",
]
OTHER = {"model/backbone": OTHER_BACKBONE, "data": ["data=cub"], "optim": ["optim=sgd"]}


def test_demo_option_files_are_what_the_demo_selects():
    """The sweep below covers exactly the demo preset's own choices."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=demo"], return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    assert {g: choices[g] for g in DEMO} == DEMO


def _compose(overrides: list[str], tmp_path: Path) -> dict:
    cfg = compose_config(overrides, tmp_path)
    return cfg, resolved(cfg)


def _alone(group: str, option_overrides: list[str], tmp_path: Path) -> dict:
    """A node as its option gives it with nothing of the demo around: composed from a
    config whose every other group is non-demo too."""
    _, plain = _compose(option_overrides, tmp_path)
    return OmegaConf.select(OmegaConf.create(plain), NODE[group])


def _strings(tree, path=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _strings(v, f"{path}[{i}]")
    else:
        yield path, str(tree)


@pytest.mark.parametrize("kept", list(DEMO))
def test_demo_options_swept_against_a_non_demo_run_leak_nothing(kept: str, tmp_path: Path):
    """Each demo option file kept in turn; backbone, data and optimiser non-demo otherwise."""
    overrides = [f"{kept}={DEMO[kept]}"]
    for group, other in OTHER.items():
        if group != kept:
            overrides += other
    if kept == "model/backbone":
        # the demo's option with another name: its settings cannot follow that name
        overrides += ["model.backbone.name=vit_small_patch16_224"]
        cfg = compose_config(overrides, tmp_path)
        with pytest.raises(UserError, match=r"model/backbone=timm model\.backbone\.name="):
            check_config(cfg)
        return
    cfg, plain = _compose(overrides, tmp_path)
    check_config(cfg)
    # every non-demo node is exactly its own option: no key or value of the demo's merged in
    for group, other in OTHER.items():
        if group != kept:
            node = OmegaConf.to_container(OmegaConf.select(OmegaConf.create(plain), NODE[group]))
            alone = _alone(group, [*OTHER_BACKBONE, "data=cars", "optim=adamw", *other], tmp_path)
            assert node == OmegaConf.to_container(alone), group
    backbone = plain["model"]["backbone"]
    assert backbone == {
        "name": "vit_small_patch16_224",
        "pretrained": False,
        "weights": None,
        "kwargs": {},
    }
    # the run's name and tags follow the data set, not the demo
    data = plain["data"]["name"]
    assert plain["task_name"] == ("demo" if kept == "data" else data)
    assert plain["tags"] == [plain["task_name"]]
    # no value anywhere outside the kept node mentions the demo (task name, weights file)
    leaks = [
        (p, v)
        for p, v in _strings({k: v for k, v in plain.items() if k != "task_name_of_data"})
        if "demo" in v.replace(str(tmp_path), "<tmp>").lower() and not p.startswith(NODE[kept])
    ]
    if kept == "data":  # the generated data set is the demo's: its run keeps that name
        leaks = [(p, v) for p, v in leaks if p not in ("task_name", "tags[0]")]
    assert leaks == []
    # the model built is timm's vit_small_patch16_224 itself, not a demo-shaped one
    if kept == "model/peft":
        embedder = build_embedder(plain["model"])
        ref = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
        built = built_report(embedder.backbone.vit)
        assert built == built_architecture(ref)
        assert (built["width"], built["depth"], built["patch_size"], built["image_size"]) == (
            384,
            12,
            [16, 16],
            [224, 224],
        )
        assert built["parameters"] == sum(p.numel() for p in ref.parameters())


def test_check_refuses_every_demo_setting_it_would_keep():
    demo = OmegaConf.to_container(OmegaConf.load(CONF / "model/backbone/vit_tiny_demo.yaml"))
    with pytest.raises(UserError) as err:
        check_backbone_option({**demo, "name": "deit_tiny_patch16_224"})
    msg = str(err.value)
    assert "kwargs={img_size: 64, patch_size: 8, embed_dim: 96, depth: 4" in msg
    assert "weights=${.synthetic_pretraining.output}" in msg and "\n" not in msg
    # the demo's own name, and a name with the option's settings neutral, pass
    check_backbone_option(demo)
    check_backbone_option(
        {**demo, "name": "deit_tiny_patch16_224", "kwargs": {}, "weights": None}
        | {"synthetic_pretraining": None}
    )
    with pytest.raises(UserError, match="model.backbone.name is not set"):
        check_backbone_option({"name": "???", "kwargs": {}})


def test_kwargs_override_merges_and_tilde_plus_replaces(tmp_path: Path):
    """Hydra merges `model.backbone.kwargs={...}` into the option's kwargs (documented in
    the option files); `~model.backbone.kwargs '+model.backbone.kwargs={...}'` replaces."""
    merged = resolved(compose_config(["model.backbone.kwargs={img_size: 32}"], tmp_path))
    assert merged["model"]["backbone"]["kwargs"] == {
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 96,
        "depth": 4,
        "num_heads": 3,
    }
    replaced = resolved(
        compose_config(
            ["~model.backbone.kwargs", "+model.backbone.kwargs={img_size: 32}"], tmp_path
        )
    )
    assert replaced["model"]["backbone"]["kwargs"] == {"img_size": 32}
    text = (CONF / "model/backbone/vit_tiny_demo.yaml").read_text()
    assert "'~model.backbone.kwargs' '+model.backbone.kwargs={...}'" in text


def test_metrics_record_the_built_model_not_the_config(tmp_path: Path):
    """metrics.json: width, depth, patch, image size and parameter count off the model."""
    kwargs = "{img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}"
    overrides = tiny_overrides(
        "model/backbone=timm",
        "model.backbone.name=vit_tiny_patch16_224",
        "model.backbone.pretrained=false",
        "~model.backbone.kwargs",
        f"+model.backbone.kwargs={kwargs}",
        "eval_before_training=false",
        "+trainer.limit_train_batches=1",
    )
    overrides = [o for o in overrides if not o.startswith("++model.backbone.kwargs")]
    cfg = compose_config(overrides, tmp_path)
    HydraConfig.instance().set_config(cfg)
    from vpt_dml.run import train

    train(cfg)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    built = written["provenance"]["backbone"]["built"]
    ref = create_backbone(
        "vit_tiny_patch16_224",
        kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
    )
    assert built == built_architecture(ref)
    assert (built["width"], built["depth"], built["num_heads"]) == (32, 2, 2)
    assert (built["patch_size"], built["image_size"]) == ([8, 8], [32, 32])
    assert built["parameters"] == sum(p.numel() for p in ref.parameters())
    assert built["architecture"] == "vit_tiny_patch16_224"


def test_built_record_of_a_hybrid_reads_the_stem_stride():
    vit = timm.create_model(
        "vit_tiny_r_s16_p8_224",
        pretrained=False,
        num_classes=0,
        img_size=64,
        embed_dim=32,
        depth=1,
        num_heads=2,
    )
    built = built_architecture(vit)
    grid = vit.patch_embed.grid_size
    assert built["patch_embed"] == "HybridEmbed"
    assert built["patch_size"] == [64 // grid[0], 64 // grid[1]]
    assert built["image_size"] == [64, 64]


def test_task_name_follows_the_data_set(tmp_path: Path):
    assert resolved(compose_config(["data=cub"], tmp_path))["task_name"] == "cub"
    assert resolved(compose_config(["data=cub"], tmp_path))["tags"] == ["cub"]
    assert resolved(compose_config([], tmp_path))["task_name"] == "demo"
    preset = resolved(compose_config([], tmp_path, experiment="cub_deep_small"))
    assert preset["task_name"] == "cub_deep_small"


def test_cached_pretraining_file_is_reused_only_for_what_it_was_made_for(tmp_path: Path):
    """The demo's weights file has a fixed name: a run with other kwargs must not reuse it
    (pos-embed resampling would load a 32-px file into the 64-px demo, every tensor present)."""
    from vpt_dml.models.synthetic_pretraining import pretrain_backbone

    out = tmp_path / "demo_backbone" / "w.safetensors"
    kwargs = dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    spec = dict(num_classes=4, images_per_class=4, epochs=1, batch_size=8)
    pretrain_backbone("vit_tiny_patch16_224", kwargs, out, **spec)
    made = out.stat().st_mtime_ns
    assert pretrain_backbone("vit_tiny_patch16_224", kwargs, out, **spec) == out  # reused
    with pytest.raises(UserError, match=r"was pretrained for vit_tiny_patch16_224\(.*img_size=32"):
        pretrain_backbone("vit_tiny_patch16_224", {**kwargs, "img_size": 64}, out, **spec)
    with pytest.raises(UserError, match="synthetic_pretraining.output to another file"):
        pretrain_backbone("vit_tiny_patch16_224", kwargs, out, **{**spec, "epochs": 2})
    assert out.stat().st_mtime_ns == made


def test_timm_option_without_a_name_says_which_name_to_give(tmp_path: Path):
    cfg = compose_config(["model/backbone=timm"], tmp_path)
    with pytest.raises(UserError, match=r"model.backbone.name is not set; name a timm ViT"):
        check_config(cfg)
