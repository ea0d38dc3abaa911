"""`vpt_dml.embed` and `vpt_dml.retrieve` on an exported tiny model and generated images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_export import backbone_weights_file, train_run, trained_embedder
from vpt_dml import embed, retrieve
from vpt_dml.data.dataset import load_transformed
from vpt_dml.data.transforms import build_transforms
from vpt_dml.export import export_run


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("embed")
    run_dir = train_run(root)
    weights = root / "model.safetensors"
    export_run(run_dir, weights)
    images = sorted((root / "data").rglob("*.jpg"))
    # a gallery of two classes, nested one level deeper to check recursion
    gallery = root / "gallery"
    for path in images[:12]:
        dest = gallery / path.parent.name / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
    return {
        "run_dir": run_dir,
        "weights": weights,
        "backbone": backbone_weights_file(run_dir, root / "backbone.safetensors"),
        "gallery": gallery,
    }


def model_args(setup) -> list[str]:
    return [str(setup["weights"]), "--backbone-weights", str(setup["backbone"])]


def test_embed_writes_trained_models_embeddings(setup, tmp_path: Path) -> None:
    out = tmp_path / "emb"
    assert embed.main([*model_args(setup), str(setup["gallery"]), str(out)]) == 0
    emb = np.load(out / "embeddings.npy")
    names = (out / "files.txt").read_text().splitlines()
    assert len(names) == len(emb) == 12 and all("/" in n for n in names)
    # the reference: the trained checkpoint's image branch on the test-time transform
    transform = build_transforms(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train=False)
    batch = torch.stack([load_transformed(str(setup["gallery"] / n), transform) for n in names])
    with torch.no_grad():
        expected = trained_embedder(setup["run_dir"])(batch).numpy()
    np.testing.assert_allclose(emb, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_retrieve_finds_the_query_itself_first(setup, tmp_path: Path, capsys) -> None:
    query = sorted(setup["gallery"].rglob("*.jpg"))[7]
    out = tmp_path / "res.json"
    args = [
        *model_args(setup),
        str(query),
        str(setup["gallery"]),
        "--top-k",
        "3",
        "--out",
        str(out),
    ]
    assert retrieve.main(args) == 0
    results = json.loads(out.read_text())
    assert len(results) == 1 and len(results[0]["neighbours"]) == 3
    top = results[0]["neighbours"]
    assert Path(top[0]["path"]) == query and top[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert [h["similarity"] for h in top] == sorted((h["similarity"] for h in top), reverse=True)
    printed = capsys.readouterr()
    assert str(query) in printed.out and "1. " in printed.out
    assert "queries" in printed.err  # the progress bar


def test_retrieve_reuses_embed_output(setup, tmp_path: Path) -> None:
    cached = tmp_path / "gallery_emb"
    assert (
        embed.main([*model_args(setup), str(setup["gallery"]), str(cached), "--no-progress"]) == 0
    )
    query = sorted(setup["gallery"].rglob("*.jpg"))[2]
    out = tmp_path / "res.json"
    args = [
        *model_args(setup),
        str(query),
        str(cached),
        "--top-k",
        "5",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert retrieve.main(args) == 0
    top = json.loads(out.read_text())[0]["neighbours"]
    assert len(top) == 5 and Path(top[0]["path"]).name == query.name


def test_bad_input_is_one_line(setup, tmp_path: Path, capsys) -> None:
    assert embed.main([*model_args(setup), str(tmp_path / "nothing"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    args = [*model_args(setup), str(setup["gallery"]), str(setup["gallery"]), "--top-k", "0"]
    assert retrieve.main(args) == 2
    assert "--top-k" in capsys.readouterr().err
