"""The whole slice in-process: config -> data -> model -> fit -> test -> metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose_config, resolved, tiny_overrides
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from vpt_dml.run import train


def _train(cfg):
    HydraConfig.instance().set_config(cfg)
    return train(cfg)


def test_run_writes_metrics_and_provenance(tmp_path: Path):
    cfg = compose_config(tiny_overrides("trainer.max_epochs=2"), tmp_path)
    metrics = _train(cfg)
    run_dir = tmp_path / "run"
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written["status"] == "finished"
    assert written["metrics"] == pytest.approx(metrics)  # float64
    # the flat metrics are the final epoch's (documented in vpt_dml/runs/record.py)
    final = dict(written["final"]["metrics"], **{"recall@1_before": metrics["recall@1_before"]})
    assert written["metrics"] == pytest.approx(final)  # float64
    assert written["final"]["epoch"] == 1
    assert written["before"]["metrics"]["recall@1"] == metrics["recall@1_before"]
    assert written["best"]["epoch"] in (0, 1)
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "recall@1_before"):
        assert 0.0 <= written["metrics"][key] <= 1.0, key
    prov = written["provenance"]
    assert prov["seed"] == 0
    assert prov["dataset"]["name"] == "synthetic"
    # counts verified against what the generator was asked for: 4 train / 4 test classes x 6
    assert prov["dataset"]["counts"]["train_images"] == 24
    assert prov["dataset"]["counts"]["test_images"] == 24
    built = prov["backbone"].pop(
        "built"
    )  # read off the model (tests/unit/test_backbone_options.py)
    assert prov["backbone"] == {
        "name": "vit_tiny_patch16_224",
        "pretrained": False,
        "weights": "random init",
    }
    assert (built["width"], built["depth"], built["image_size"]) == (32, 2, [32, 32])
    assert prov["global_step"] == 2 * (24 // 8)
    assert prov["eval_candidates"]["dtype"] in ("bfloat16", "float32")
    assert prov["eval_candidates"]["reason"]
    # what trained, read off the built model: the demo's 4 prompts on both tiny layers + BitFit
    method = written["method"]
    assert (method["peft"], method["bitfit"]) == ("vptsp", True)
    assert method["prompt_tokens_per_layer"] == [4, 4]
    assert method["proxy"]["class_prompt_tokens_per_layer"] == [2, 2]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    saved = OmegaConf.load(run_dir / "config_resolved.yaml")
    assert saved.model.backbone.name == "vit_tiny_patch16_224"
    assert "hydra" not in saved


def test_seed_zero_is_a_seed(tmp_path: Path):
    """seed=0 must seed (a falsy check would skip it): two runs give identical metrics."""
    a = _train(compose_config(tiny_overrides("seed=0"), tmp_path / "a"))
    b = _train(compose_config(tiny_overrides("seed=0"), tmp_path / "b"))
    assert a == b


def test_default_run_is_the_demo_preset(tmp_path: Path):
    plain = resolved(compose_config([], tmp_path))
    spelled = resolved(compose_config([], tmp_path, experiment="demo"))
    assert plain == spelled
    assert plain["data"]["name"] == "synthetic"
    assert plain["model"]["proxy"]["kind"] == "semantic_gru"
