"""check_config: unknown keys, wrong types and self-contradictory methods end in one line."""

from __future__ import annotations

import pytest
from conftest import compose_config, tiny_overrides

from vpt_dml.errors import UserError
from vpt_dml.models.method_summary import features_from_config, peft_method_of
from vpt_dml.runs.config_schema import check_config


def refused(overrides: list[str], tmp_path, experiment: str | None = None) -> str:
    cfg = compose_config(overrides, tmp_path, experiment)
    with pytest.raises(UserError) as err:
        check_config(cfg)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("override", "names"),
    [
        # a `+` typo in optim, the root, data and loss: the key and its nearest spelling
        ("+optim.learning_rate=1e-3", ["optim.learning_rate", "optim.lr"]),
        ("+eval_before_trainig=false", ["eval_before_trainig", "eval_before_training"]),
        ("+data.typo=1", ["data.typo", "RetrievalDataModule"]),
        ("+loss.typo=1", ["loss.typo", "ProxyAnchorLoss"]),
        ("+data.fast_decod=false", ["data.fast_decod", "data.fast_decode"]),
        ("+optim.optimizer.epss=1e-6", ["optim.optimizer.epss", "optim.optimizer.eps"]),
        ("+model.peft.bitfitt=true", ["model.peft.bitfitt", "model.peft.bitfit"]),
        ("+model.proxy.bias_ration=0.3", ["model.proxy.bias_ration", "model.proxy.bias_ratio"]),
        ("+trainer.max_epoch=3", ["trainer.max_epoch", "trainer.max_epochs"]),
        # the right name at the wrong level
        ("+max_epochs=3", ["max_epochs", "trainer.max_epochs"]),
    ],
)
def test_unknown_key_names_the_nearest_known_spelling(override, names, tmp_path):
    message = refused(tiny_overrides(override), tmp_path)
    assert message.startswith("unknown config key")
    for name in names:
        assert name in message


def test_a_key_of_another_option_of_the_group_is_unknown(tmp_path):
    # alpha is a key of loss/proxy_anchor, not of proxy_nca's target
    message = refused(["loss=proxy_nca", "+loss.alpha=3"], tmp_path)
    assert "loss.alpha" in message and "ProxyNCALoss" in message and "loss.scale" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.max_epochs=abc", ["trainer.max_epochs='abc'", "an integer"]),
        ("trainer.max_epochs=1.5", ["trainer.max_epochs=1.5", "an integer"]),
        ("model.peft.prompts.num=abc", ["model.peft.prompts.num", "an integer"]),
        ("model.peft.bitfit=1", ["model.peft.bitfit=1", "true or false"]),
        ("optim.lr=fast", ["optim.lr='fast'", "a number"]),
        ("data.batch_size=[8]", ["data.batch_size", "an integer"]),
        ("trainer.devices=1.5", ["trainer.devices=1.5", "an integer"]),
        ("model.proxy.class_prompts=3", ["model.proxy.class_prompts=3", "a mapping"]),
    ],
)
def test_wrong_type_names_key_and_expected_type(override, expected, tmp_path):
    message = refused(tiny_overrides(override), tmp_path)
    assert "wrong type" in message
    for part in expected:
        assert part in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model/peft=linear", "model.peft.bitfit=true"], ["model.peft.name=linear", "bitfit"]),
        (
            ["model/peft=linear", "model.peft.prompts.num=5", "model.peft.prompts.depth=12"],
            ["model.peft.name=linear", "deep prompts"],
        ),
        (
            ["model/peft=bitfit", "model.peft.prompts.num=5", "model.peft.prompts.depth=3"],
            ["bitfit"],
        ),
        (["model/peft=vpt_deep", "model.peft.bitfit=true"], ["vpt_deep", "model/peft=vptsp"]),
        (["model/peft=vpt_deep", "model.peft.prompts.depth=1"], ["model/peft=vpt_shallow"]),
        (["model/peft=vpt_shallow", "model.peft.prompts.num=0"], ["model/peft=linear"]),
        (["model/peft=full", "model.peft.adapter.enabled=true"], ["full", "adapter.enabled=true"]),
        (["model/peft=lora", "model.peft.full=true"], ["lora", "model.peft.full=true"]),
        (["model.peft.bitfit=false"], ["model.peft.name=vptsp", "model/peft=vpt_deep"]),
        (["model.peft.name=prefix"], ["model.peft.name='prefix'", "custom"]),
        (
            ["model/proxy=learned", "+model.proxy.bias_ratio=0.2"],
            ["model.proxy.bias_ratio", "proxies.learned takes no bias_ratio"],
        ),
        (["model/proxy=semantic_mix", "+model.proxy.update=gru"], ["semantic_mix", "update"]),
        (["model/proxy=semantic_gru", "+model.proxy.mix_lambda=0.5"], ["mix_lambda"]),
        (["model.proxy.kind=banana"], ["model.proxy.kind"]),
        (["model.proxy.update=lstm"], ["model.proxy.update='lstm'"]),
        (["optim=adamw", "+optim.momentum=0.5"], ["optim.momentum", "AdamW"]),
        (["model/peft=base"], ["model.peft.name", "???"]),
    ],
)
def test_self_contradictory_method_is_refused(overrides, expected, tmp_path):
    message = refused(tiny_overrides(*overrides), tmp_path)
    for part in expected:
        assert part in message, message


def test_issue_example_on_a_preset(tmp_path):
    # the old failure mode, now spelled out: linear with the preset's prompts and BitFit
    message = refused(
        [
            "model/peft=linear",
            "model.peft.prompts.num=90",
            "model.peft.prompts.depth=12",
            "model.peft.bitfit=true",
        ],
        tmp_path,
        experiment="sop_deep",
    )
    assert "model.peft.name=linear" in message and "model/peft=vptsp" in message


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["++model.backbone.synthetic_pretraining=null", "+trainer.limit_train_batches=2"],
        [
            "+callbacks.save_rank_state._target_=vpt_dml.distributed.SaveRankState",
            "+callbacks.save_rank_state.dirpath=/tmp/x",
        ],
        ["trainer=ddp_cpu", "logger=wandb", "trainer.devices=2"],
        ["trainer.devices=auto", "trainer.precision=bf16-mixed", "+trainer.fast_dev_run=true"],
        ["model.embed_dim=null", "data.val_classes=2", "data.recall_ks=[1,5]", "seed=null"],
        ["+optim.optimizer.eps=1e-6", "optim.optimizer.betas=[0.8,0.99]"],
        ["model.peft.name=custom", "model.peft.bitfit=true", "model.peft.adapter.enabled=true"],
        ["model/peft=vpt_shallow", "model/proxy=semantic_gru_tanh", "model.proxy.dropout=0.1"],
        ["model.proxy.class_prompt_store=host", "model.proxy.class_prompt_step=global"],
        ["model.peft.prompts.num=1", "model.peft.prompts.depth=1"],  # a shallow VPTSP
        ["eval.start_epoch=2", "eval.every_n_epochs=2", "+model.peft.adapter.num_blocks=1"],
        ["loss=proxy_anchor_vptsp", "loss.proxy_range=in_batch"],
        ["loss=proxy_nca", "loss.scale=8"],
        ["optim=sgd", "optim.momentum=0.5", "+optim.optimizer.nesterov=true"],
    ],
)
def test_valid_configs_pass(overrides, tmp_path):
    check_config(compose_config(tiny_overrides(*overrides), tmp_path))  # raises nothing
    # the same config with one misspelt key is refused: the check read this config
    typo = compose_config(tiny_overrides(*overrides, "+eval_before_trainig=false"), tmp_path)
    with pytest.raises(UserError, match="eval_before_training"):
        check_config(typo)


@pytest.mark.parametrize(
    "option", ["linear", "bitfit", "vpt_shallow", "vpt_deep", "adapter", "lora", "full"]
)
def test_every_peft_option_passes_on_a_preset(option, tmp_path):
    cfg = compose_config([f"model/peft={option}"], tmp_path, "cub_deep_small")
    check_config(cfg)  # raises nothing
    # and the preset's own prompts / BitFit did not leak into the chosen method
    assert peft_method_of(features_from_config(cfg.model.peft)) == option
