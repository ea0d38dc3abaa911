"""+hparams_search=optuna: validation classes only, a persistent study, the best trial.

- the objective (what `vpt_dml.run` returns to the sweeper) does not change when every
  test-split image changes, while the test metrics do;
- a trial without validation classes is refused before it trains;
- a tiny search through the command line: tests/processes/test_optuna_search_cli.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose_config, tiny_overrides
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from PIL import Image, ImageOps

from vpt_dml.errors import UserError
from vpt_dml.run import train
from vpt_dml.runs.search import check_search

pytest.importorskip("optuna")
pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")

VALIDATION = "validation classes"  # metrics.json split label (runs/record.py)
# 16 generated classes: 8 train (2 of them held out for validation), 8 test
HELD_OUT = ["data.synthetic.num_classes=16", "data.val_classes=0.25", "trainer.max_epochs=2"]


def _train(cfg) -> dict:
    HydraConfig.instance().set_config(cfg)
    return train(cfg)


def _record(cfg) -> dict:
    return json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


def _test_images(data_dir: Path) -> list[Path]:
    """The image files of the test classes (the CUB layout's second half of the classes)."""
    (cub,) = data_dir.glob("synthetic/*/CUB_200_2011")
    labels = dict(
        line.split() for line in (cub / "image_class_labels.txt").read_text().splitlines()
    )
    classes = sorted({int(c) for c in labels.values()})
    test = set(classes[len(classes) // 2 :])
    return [
        cub / "images" / path
        for image_id, path in (
            line.split() for line in (cub / "images.txt").read_text().splitlines()
        )
        if int(labels[image_id]) in test
    ]


def test_objective_never_reads_the_test_split(tmp_path: Path):
    first = compose_config(tiny_overrides(*HELD_OUT), tmp_path / "a")
    objective_a = _train(first)["recall@1"]
    data_dir = Path(first.paths.data_dir)
    # every test image changes (mirrored, colours inverted); train and validation stay
    images = _test_images(data_dir)
    assert len(images) == 8 * 6
    for path in images:
        with Image.open(path) as im:
            changed = ImageOps.invert(ImageOps.mirror(im.convert("RGB")))
        changed.save(path, format=im.format)
    second = compose_config(tiny_overrides(*HELD_OUT), tmp_path / "b")
    with open_dict(second):
        second.paths.data_dir = str(data_dir)  # the same (changed) dataset files
    objective_b = _train(second)["recall@1"]

    a, b = _record(first), _record(second)
    assert a["final"]["split"] == b["final"]["split"] == VALIDATION
    assert objective_a == objective_b == a["final"]["metrics"]["recall@1"]
    # the change reached the test split: its metrics moved
    assert a["best"]["split"] == "test"
    assert a["best"]["metrics"] != b["best"]["metrics"]


def test_a_trial_without_validation_classes_is_refused(tmp_path: Path):
    cfg = compose_config(tiny_overrides("+hparams_search=optuna"), tmp_path)
    HydraConfig.instance().set_config(cfg)
    assert cfg.data.val_classes > 0
    check_search(cfg)  # the search's own setting passes
    with open_dict(cfg):
        cfg.data.val_classes = 0.0
    with pytest.raises(UserError, match="data.val_classes>0"):
        check_search(cfg)
