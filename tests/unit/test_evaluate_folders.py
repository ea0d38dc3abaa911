"""`vpt_dml.evaluate` on a query folder and a gallery folder (issue 25)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.unit.test_embed_retrieve import one_error_line
from tests.unit.test_index import demo  # noqa: F401 - the module fixture: tiny run, export
from vpt_dml import embed, evaluate
from vpt_dml.evaluation.retrieval import retrieval_metrics


def split_folders(paths: list[Path], root: Path) -> tuple[Path, Path]:
    """Per class: 2 images to queries/<class>/, the rest to gallery/<class>/; the last
    class only to queries (it has nothing to retrieve)."""
    by_class: dict[str, list[Path]] = {}
    for p in paths:
        by_class.setdefault(p.parent.name, []).append(p)
    last = sorted(by_class)[-1]
    for name, files in sorted(by_class.items()):
        for i, f in enumerate(files):
            role = "queries" if i < 2 or name == last else "gallery"
            dest = root / role / name / f.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest)
    return root / "queries", root / "gallery"


def embedded_with_labels(weights: Path, folder: Path, out: Path) -> tuple[np.ndarray, list[str]]:
    assert embed.main([str(weights), str(folder), str(out), "--no-progress"]) == 0
    names = (out / "files.txt").read_text().splitlines()
    return np.load(out / "embeddings.npy"), [Path(n).parts[0] for n in names]


def test_evaluate_equals_retrieval_metrics_in_gallery_mode(demo, tmp_path: Path, capsys) -> None:  # noqa: F811
    q_dir, g_dir = split_folders(demo["paths"], tmp_path)
    out = tmp_path / "m.json"
    args = [str(demo["weights"]), "--queries", str(q_dir), "--gallery", str(g_dir)]
    assert evaluate.main([*args, "--ks", "1,2,4", "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    # the same embeddings, by embed, labelled by class name across both folders
    q, q_names = embedded_with_labels(demo["weights"], q_dir, tmp_path / "qe")
    g, g_names = embedded_with_labels(demo["weights"], g_dir, tmp_path / "ge")
    code = {c: i for i, c in enumerate(sorted(set(q_names) | set(g_names)))}
    ql, gl = np.array([code[c] for c in q_names]), np.array([code[c] for c in g_names])
    expected = retrieval_metrics(q, ql, (1, 2, 4), g, gl)
    assert result["metrics"] == pytest.approx(expected, abs=1e-12)  # float64
    # gallery mode, not one pooled set: pooled, the numbers are others
    pooled = retrieval_metrics(np.concatenate([q, g]), np.concatenate([ql, gl]), (1, 2, 4))
    assert pooled != pytest.approx(expected, abs=1e-6)
    assert result["queries"] == 8 * 2 + 4 and result["gallery"] == 7 * 4
    assert result["queries_without_gallery_class"] == 6
    printed = capsys.readouterr()
    assert f"{100 * expected['recall@1']:6.2f}" in printed.out
    assert "6 queries have no gallery image of their class" in printed.err


def test_images_outside_class_folders_are_refused_in_one_line(demo, tmp_path: Path, capsys) -> None:  # noqa: F811
    q_dir, g_dir = split_folders(demo["paths"], tmp_path)
    loose = g_dir / "loose.jpg"
    shutil.copy(demo["paths"][0], loose)
    args = [str(demo["weights"]), "--queries", str(q_dir), "--gallery", str(g_dir)]
    assert evaluate.main([*args, "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "loose.jpg" in line and "subfolder" in line


def test_the_same_folder_as_queries_and_gallery_leaves_each_query_out(
    demo,  # noqa: F811
    tmp_path: Path,
    capsys,
) -> None:
    """Issue 28 item 2: `--queries X --gallery X` reported Recall@1 = 100 (every query
    found its own file). Now: the query-equals-gallery metrics of training-time evaluation."""
    q_dir, _ = split_folders(demo["paths"], tmp_path)
    link = tmp_path / "link_to_queries"
    link.symlink_to(q_dir, target_is_directory=True)
    q, names = embedded_with_labels(demo["weights"], q_dir, tmp_path / "qe")
    labels = np.unique(names, return_inverse=True)[1]
    expected = retrieval_metrics(q, labels, (1, 2))
    assert expected["recall@1"] < 1.0  # else the test could not tell the two apart
    for gallery in (q_dir, link):  # the same folder, or the same files through a link
        out = tmp_path / f"{gallery.name}.json"
        args = [str(demo["weights"]), "--queries", str(q_dir), "--gallery", str(gallery)]
        assert evaluate.main([*args, "--ks", "1,2", "--out", str(out), "--no-progress"]) == 0
        result = json.loads(out.read_text())
        assert result["metrics"] == pytest.approx(expected, abs=1e-12)  # float64
        assert result["mode"] == "leave-one-out" and result["gallery"] == result["queries"] == 20
        assert result["queries_without_gallery_class"] == 0  # every class has 2 or more
        assert "left out of its own neighbours" in capsys.readouterr().out


def test_folders_sharing_some_files_are_refused_in_one_line(demo, tmp_path: Path, capsys) -> None:  # noqa: F811
    q_dir, g_dir = split_folders(demo["paths"], tmp_path)
    shared = next(q_dir.rglob("*.jpg"))
    (g_dir / shared.parent.name).mkdir(exist_ok=True)
    (g_dir / shared.parent.name / "same.jpg").symlink_to(shared)
    args = [str(demo["weights"]), "--queries", str(q_dir), "--gallery", str(g_dir)]
    assert evaluate.main([*args, "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "1 of the 20 query images are also gallery images" in line and shared.name in line
