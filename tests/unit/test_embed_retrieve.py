"""`vpt_dml.embed` and `vpt_dml.retrieve` on an exported tiny model and generated images."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tolerances import close

from tests.runs.test_export import backbone_weights_file, trained_embedder
from vpt_dml import embed, retrieve
from vpt_dml.data.dataset import load_transformed
from vpt_dml.data.transforms import build_transforms
from vpt_dml.serving import embeddings


@pytest.fixture(scope="module")
def setup(tmp_path_factory, exported_run) -> dict:
    root = tmp_path_factory.mktemp("embed")
    run_dir, weights = exported_run["run_dir"], exported_run["weights"]  # the session's run
    images = sorted(exported_run["data"].rglob("*.jpg"))
    # a gallery of two classes, nested one level deeper to check recursion
    gallery = root / "gallery"
    for path in images[:12]:
        dest = gallery / path.parent.name / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
    return {
        "root": root,
        "run_dir": run_dir,
        "weights": weights,
        "backbone": backbone_weights_file(run_dir, root / "backbone.safetensors"),
        "gallery": gallery,
    }


def model_args(setup, weights: Path | None = None) -> list[str]:
    return [str(weights or setup["weights"]), "--backbone-weights", str(setup["backbone"])]


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def other_model(setup, out: Path) -> Path:
    """The same export with one tuned tensor changed: same backbone, another model."""
    with safe_open(str(setup["weights"]), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["head.fc.weight"] = tensors["head.fc.weight"] + 0.5
    save_file(tensors, str(out), metadata=meta)
    return out


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory) -> Path:
    """A straight embed of the gallery, the yardstick for skipped and resumed runs."""
    out = tmp_path_factory.mktemp("reference") / "emb"
    assert embed.main([*model_args(setup), str(setup["gallery"]), str(out), "--no-progress"]) == 0
    return out


def rows_by_name(folder: Path) -> dict[str, np.ndarray]:
    emb = np.load(folder / "embeddings.npy")
    return dict(zip((folder / "files.txt").read_text().splitlines(), emb))


def test_embed_writes_trained_models_embeddings(setup, reference) -> None:
    emb = np.load(reference / "embeddings.npy")
    names = (reference / "files.txt").read_text().splitlines()
    assert len(names) == len(emb) == 12 and all("/" in n for n in names)
    meta = json.loads((reference / "embed.json").read_text())
    assert Path(meta["image_root"]) == setup["gallery"].resolve() and meta["skipped"] == 0
    assert not (reference / "skipped.txt").exists() and not (reference / "chunks").exists()
    # the reference: the trained checkpoint's image branch on the test-time transform
    transform = build_transforms(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train=False)
    batch = torch.stack([load_transformed(str(setup["gallery"] / n), transform) for n in names])
    with torch.no_grad():
        expected = trained_embedder(setup["run_dir"])(batch).numpy()
    np.testing.assert_allclose(emb, expected, **close(np.float32))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, **close(np.float32))


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


def test_retrieve_from_embed_output_names_real_image_paths(
    setup, reference, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)  # paths must not depend on where retrieve runs
    query = sorted(setup["gallery"].rglob("*.jpg"))[2]
    out = tmp_path / "res.json"
    args = [*model_args(setup), str(query), str(reference), "--top-k", "5", "--out", str(out)]
    assert retrieve.main([*args, "--no-progress"]) == 0
    top = json.loads(out.read_text())[0]["neighbours"]
    assert len(top) == 5 and Path(top[0]["path"]).resolve() == query.resolve()
    assert all(Path(h["path"]).is_file() for h in top)
    printed = [line.split()[-1] for line in capsys.readouterr().out.splitlines() if ". " in line]
    assert len(printed) == 5 and all(Path(p).is_file() for p in printed)
    assert not any(str(reference) in p for p in printed)


def test_gallery_of_another_model_is_refused(setup, reference, tmp_path: Path, capsys) -> None:
    weights_b = other_model(setup, tmp_path / "b.safetensors")
    query = sorted(setup["gallery"].rglob("*.jpg"))[0]
    args = [*model_args(setup, weights_b), str(query), str(reference), "--no-progress"]
    assert retrieve.main([*args, "--out", str(tmp_path / "r.json")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "embedded with another model" in line and str(weights_b) in line
    assert not (tmp_path / "r.json").exists()


def test_gallery_without_fingerprint_is_refused(setup, reference, tmp_path: Path, capsys) -> None:
    old = tmp_path / "old"
    old.mkdir()
    for name in ("embeddings.npy", "files.txt"):  # what an older embed wrote
        shutil.copy(reference / name, old / name)
    query = sorted(setup["gallery"].rglob("*.jpg"))[0]
    assert retrieve.main([*model_args(setup), str(query), str(old), "--no-progress"]) == 2
    assert "no embed.json" in one_error_line(capsys.readouterr().err)


@pytest.fixture
def broken_gallery(setup, tmp_path: Path) -> tuple[Path, Path]:
    gallery = tmp_path / "gallery"
    shutil.copytree(setup["gallery"], gallery)
    bad = sorted(gallery.rglob("*.jpg"))[9]
    truncate(bad)
    return gallery, bad


def test_embed_broken_image_names_file_and_flag(setup, broken_gallery, tmp_path, capsys) -> None:
    gallery, bad = broken_gallery
    out = tmp_path / "emb"
    args = [*model_args(setup), str(gallery), str(out), "--no-progress", "--chunk-size", "4"]
    assert embed.main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(bad) in line and "--skip-broken" in line and "data.skip_broken" not in line
    assert "2 of 3 chunks are saved" in line  # the images before it are not lost


def test_embed_skip_broken_keeps_every_other_image(
    setup, broken_gallery, reference, tmp_path: Path, capsys
) -> None:
    gallery, bad = broken_gallery
    out = tmp_path / "emb"
    args = [*model_args(setup), str(gallery), str(out), "--no-progress", "--skip-broken"]
    assert embed.main(args) == 0
    assert "skipped 1 undecodable image(s)" in capsys.readouterr().err
    rows = rows_by_name(out)
    bad_name = str(bad.relative_to(gallery))
    expected = {k: v for k, v in rows_by_name(reference).items() if k != bad_name}
    assert sorted(rows) == sorted(expected) and len(rows) == 11
    for name, row in rows.items():
        np.testing.assert_allclose(row, expected[name], **close(np.float32))
    listed = (out / "skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == [bad_name]
    assert json.loads((out / "embed.json").read_text())["skipped"] == 1


def test_interrupted_embed_resumes_without_recomputing(
    setup, reference, tmp_path: Path, monkeypatch
) -> None:
    real = embeddings.embed_files
    calls: list[int] = []
    interrupt_at = [3]

    def counting(model, files, *args, **kwargs):
        calls.append(len(files))
        if len(calls) == interrupt_at[0]:
            raise KeyboardInterrupt  # the user's Ctrl-C during the third chunk
        return real(model, files, *args, **kwargs)

    monkeypatch.setattr(embeddings, "embed_files", counting)
    out = tmp_path / "emb"
    args = [*model_args(setup), str(setup["gallery"]), str(out), "--no-progress"]
    with pytest.raises(KeyboardInterrupt):
        embed.main([*args, "--chunk-size", "2"])
    assert len(list((out / "chunks").glob("chunk_*.npz"))) == 2
    calls.clear()
    interrupt_at[0] = 0
    assert embed.main([*args, "--chunk-size", "2"]) == 0
    assert calls == [2, 2, 2, 2]  # 6 chunks of 2 images, 2 of them done before
    resumed, straight = rows_by_name(out), rows_by_name(reference)
    assert list(resumed) == list(straight)
    np.testing.assert_allclose(
        np.stack(list(resumed.values())), np.stack(list(straight.values())), **close(np.float32)
    )
    calls.clear()
    assert embed.main([*args, "--chunk-size", "2"]) == 0 and calls == []  # already done


def test_retrieve_gallery_folder_skip_broken(setup, broken_gallery, tmp_path: Path, capsys):
    gallery, bad = broken_gallery
    query = sorted(gallery.rglob("*.jpg"))[0]
    out = tmp_path / "res.json"
    args = [*model_args(setup), str(query), str(gallery), "--top-k", "20", "--no-progress"]
    assert retrieve.main([*args, "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(bad) in line and "--skip-broken" in line
    assert retrieve.main([*args, "--out", str(out), "--skip-broken"]) == 0
    hits = [h["path"] for h in json.loads(out.read_text())[0]["neighbours"]]
    assert len(hits) == 11 and str(bad) not in hits
    assert (tmp_path / "res.skipped.txt").read_text().startswith(str(bad))


def test_non_image_query_names_the_file(setup, tmp_path: Path, capsys) -> None:
    query = tmp_path / "notes.jpg"
    query.write_text("not an image")
    assert retrieve.main([*model_args(setup), str(query), str(setup["gallery"])]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(query) in line and "give an image file" in line and "skip_broken" not in line


def test_bad_input_is_one_line(setup, tmp_path: Path, capsys) -> None:
    assert embed.main([*model_args(setup), str(tmp_path / "nothing"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    args = [*model_args(setup), str(setup["gallery"]), str(setup["gallery"]), "--top-k", "0"]
    assert retrieve.main(args) == 2
    assert "--top-k" in capsys.readouterr().err


def test_a_folder_of_symlinks_embeds_and_retrieves_under_the_links_names(
    setup, reference, tmp_path: Path, capsys
) -> None:
    """A folder of links into a dataset (how one often picks images) used to end in a
    ValueError traceback: the files were resolved to targets outside the folder."""
    links = tmp_path / "links"
    links.mkdir()
    targets = sorted(setup["gallery"].rglob("*.jpg"))[:5]
    for i, target in enumerate(targets):
        (links / f"q{i}.jpg").symlink_to(target)
    out = tmp_path / "emb"
    assert embed.main([*model_args(setup), str(links), str(out), "--no-progress"]) == 0
    names = (out / "files.txt").read_text().splitlines()
    assert names == [f"q{i}.jpg" for i in range(5)]
    by_name = rows_by_name(reference)
    rows = np.load(out / "embeddings.npy")
    for row, target in zip(rows, targets):
        np.testing.assert_allclose(
            row, by_name[str(target.relative_to(setup["gallery"]))], **close(np.float32)
        )
    found = tmp_path / "found.json"
    args = [
        *model_args(setup),
        str(links / "q0.jpg"),
        str(out),
        "--top-k",
        "1",
        "--out",
        str(found),
    ]
    assert retrieve.main(args) == 0
    first = json.loads(found.read_text())[0]["neighbours"][0]
    assert Path(first["path"]) == links / "q0.jpg"


@pytest.mark.parametrize(
    "odd", [b"two\nlines.jpg", b"carriage\rreturn.jpg", b"sep\xe2\x80\xa8.jpg", b"latin\xff.jpg"]
)
def test_a_file_name_files_txt_cannot_hold_is_refused_in_one_line(
    setup, reference, tmp_path: Path, capsys, odd: bytes
) -> None:
    """Issue 28 item 15: a newline in a name wrote 13 lines for 12 rows (and rerunning, as
    the reader advised, wrote them again); a non-UTF-8 name ended in a traceback."""
    gallery = tmp_path / "gallery"
    shutil.copytree(setup["gallery"], gallery)
    first = sorted(gallery.rglob("*.jpg"))[0]
    renamed = os.path.join(os.fsencode(first.parent), odd)
    os.rename(os.fsencode(first), renamed)
    out = tmp_path / "emb"
    args = [*model_args(setup), str(gallery), str(out), "--no-progress"]
    assert embed.main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    name = str(Path(os.fsdecode(renamed)).relative_to(gallery))
    assert repr(name) in line and "rename the file" in line
    assert not (out / "files.txt").exists() and not (out / "embeddings.npy").exists()
    os.rename(renamed, os.fsencode(first))  # the advice, followed: the folder embeds
    assert embed.main(args) == 0
    assert rows_by_name(out).keys() == rows_by_name(reference).keys()


@pytest.mark.parametrize("kind", ["embed", "index", "images"])
def test_retrieve_saves_next_to_the_gallery_not_the_working_directory(
    setup, reference, tmp_path: Path, monkeypatch, capsys, kind
) -> None:
    """Issue 28 item 16: without --out, retrieve wrote ./retrieval.json wherever it ran."""
    from vpt_dml import index

    if kind == "embed":
        gallery = tmp_path / "emb"
        shutil.copytree(reference, gallery)
        expected = gallery / "retrieval.json"
    elif kind == "index":
        gallery = tmp_path / "g.faiss"
        assert index.main(["build", str(reference), str(gallery)]) == 0
        expected = tmp_path / "g.retrieval.json"
    else:
        gallery = tmp_path / "images"
        shutil.copytree(setup["gallery"], gallery)
        expected = tmp_path / "images.retrieval.json"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    query = sorted(setup["gallery"].rglob("*.jpg"))[4]
    args = [*model_args(setup), str(query), str(gallery), "--top-k", "3", "--no-progress"]
    assert retrieve.main(args) == 0
    assert list(cwd.iterdir()) == []
    assert f"saved to {expected}" in capsys.readouterr().out
    assert retrieve.main([*args, "--out", str(tmp_path / "given.json")]) == 0
    assert json.loads(expected.read_text()) == json.loads((tmp_path / "given.json").read_text())
    if kind == "images":  # nothing was written into the user's image folder
        assert sorted(gallery.rglob("*.json")) == []
