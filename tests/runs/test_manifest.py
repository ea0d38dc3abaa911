"""split.json and its hash: the identity of a split (not of the folder it sits in), carried
into metrics.json with the decode path, In-Shop's image folder and the In-Shop queries that
no gallery image matches (issue 19, finding 11: they were left out uncounted)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_BACKBONE, TINY_TRAINER, compose_config
from tests.fake_layouts import distinct_images, fake_cub, fake_inshop
from vpt_dml.data.datamodule import RetrievalDataModule
from vpt_dml.data.manifest import file_digests, split_sha256
from vpt_dml.data.registry import load_splits
from vpt_dml.evaluation.protocol import records_sha256


def test_the_hash_follows_the_split_not_the_folder(tmp_path: Path):
    a = distinct_images(fake_cub(tmp_path / "a", classes=4, per_class=2))
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    sha = split_sha256(load_splits("cub", str(a))[0])
    assert sha == split_sha256(load_splits("cub", str(b))[0])
    # one image moved to another class: same files, another split
    labels = b / "CUB_200_2011" / "image_class_labels.txt"
    labels.write_text(labels.read_text().replace("\n3 2\n", "\n3 1\n", 1))
    assert split_sha256(load_splits("cub", str(b))[0]) != sha


def with_lonely_query(root: Path) -> Path:
    """fake_inshop plus item 13: two query images, no gallery image."""
    fake_inshop(root)
    part = root / "Eval" / "list_eval_partition.txt"
    lines = part.read_text().splitlines()
    for j in (1, 2):
        rel = f"img/WOMEN/Dresses/id_00000013/{j:02d}_1_front.jpg"
        (root / "Img" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(
            root / "Img" / "img/WOMEN/Dresses/id_00000001/01_1_front.jpg", root / "Img" / rel
        )
        lines.append(f"{rel} id_00000013 query")
    lines[0] = str(len(lines) - 2)
    part.write_text("\n".join(lines) + "\n")
    return root


def test_inshop_queries_without_a_gallery_image_are_counted(tmp_path: Path):
    dm = RetrievalDataModule(name="inshop", root=str(with_lonely_query(tmp_path)),
                             num_workers=0, strict_counts=False)  # fmt: skip
    dm.load()
    assert dm.count_report["queries_without_gallery"] == 2
    plain = RetrievalDataModule(name="inshop", root=str(fake_inshop(tmp_path / "plain")),
                                num_workers=0, strict_counts=False)  # fmt: skip
    plain.load()
    assert plain.count_report["queries_without_gallery"] == 0


def test_inshop_image_folder_is_recorded_and_changes_the_split(tmp_path: Path):
    low = fake_inshop(tmp_path / "low")
    high = tmp_path / "high"
    shutil.copytree(low / "Eval", high / "Eval")
    shutil.copytree(low / "Img" / "img", high / "img_highres")
    reports = []
    for root, images in ((low, None), (high, None), (low, "img")):
        dm = RetrievalDataModule(name="inshop", root=str(root), num_workers=0,
                                 strict_counts=False, inshop_images=images)  # fmt: skip
        dm.load()
        reports.append(dm.count_report)
    assert [r["inshop_images"] for r in reports] == ["img", "img_highres", "img"]
    assert reports[0]["split_sha256"] == reports[2]["split_sha256"] != reports[1]["split_sha256"]
    with pytest.raises(Exception, match="choose img or img_highres"):
        RetrievalDataModule(name="inshop", root=str(low), inshop_images="large").load()


def test_a_runs_metrics_json_carries_the_manifests_hash(tmp_path: Path):
    from vpt_dml.run import train

    root = with_lonely_query(tmp_path / "inshop")
    data = ["data=inshop", f"data.root={root}", "data.strict_counts=false", "data.num_workers=0",
            "data.batch_size=4", "data.samples_per_class=2", "data.eval_batch_size=64",
            "data.recall_ks=[1,2]"]  # fmt: skip
    cfg = compose_config(TINY_BACKBONE + TINY_TRAINER + data, tmp_path)
    train(cfg)
    result = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    dataset = result["provenance"]["dataset"]
    written = json.loads((root / "split.json").read_text())  # by the loader: it was absent
    assert (
        dataset["split_sha256"]
        == written["sha256"]
        == split_sha256(load_splits("inshop", str(root))[0])
    )
    assert written["counts"]["test"] == {"images": 6, "classes": 3}
    assert dataset["inshop_images"] == "img" and dataset["decode"] == "torchvision"
    assert dataset["queries_without_gallery"] == 2


# --- issue 28 item 3: the split hash sees the bytes, cheaply ----------------------------


def test_same_file_names_with_other_pixels_are_another_split(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    a = distinct_images(fake_cub(tmp_path / "a", classes=4, per_class=2))
    b = tmp_path / "b"
    shutil.copytree(a, b)
    sha = split_sha256(load_splits("cub", str(a))[0])
    assert split_sha256(load_splits("cub", str(b))[0]) == sha  # a true copy: one split
    one = sorted((b / "CUB_200_2011" / "images").rglob("*.jpg"))[-1]  # a test image
    one.write_bytes(bytes(255 - x for x in one.read_bytes()))  # same size, other pixels
    assert split_sha256(load_splits("cub", str(b))[0]) != sha
    test = load_splits("cub", str(a))[0].test
    copy = load_splits("cub", str(b))[0].test
    # the protocol's own fallback hash (runs without a manifest hash) sees them too
    assert records_sha256(test, root=str(a)) != records_sha256(copy, root=str(b))


def test_a_rewritten_file_is_hashed_again_even_with_its_old_size_and_mtime(
    tmp_path: Path, monkeypatch
):
    """The digest cache is keyed on the stat identity; ctime moves on any rewrite."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    f = tmp_path / "data" / "x.bin"
    f.parent.mkdir()
    f.write_bytes(b"a" * 1000)
    first = file_digests([str(f)], str(f.parent))
    assert file_digests([str(f)], str(f.parent)) == first  # from the cache
    st = f.stat()
    time.sleep(0.01)
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `cp -p` or tar would leave it
    again = file_digests([str(f)], str(f.parent))
    assert again[0][0] == 1000 and again != first


def test_an_older_names_only_split_json_is_rewritten_not_reported_as_changed(
    tmp_path: Path, monkeypatch, caplog
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = distinct_images(fake_cub(tmp_path / "cub", classes=4, per_class=2))
    (root / "split.json").write_text(json.dumps({"sha256": "0" * 64, "dataset": "cub"}))
    dm = RetrievalDataModule(name="cub", root=str(root), num_workers=0, strict_counts=False)
    dm.load()
    assert "split_json_sha256" not in dm.count_report and "written for another" not in caplog.text
    assert (
        json.loads((root / "split.json").read_text())["sha256"] == dm.count_report["split_sha256"]
    )


def test_runs_on_two_copies_with_other_pixels_are_not_paired_or_pooled(
    tmp_path: Path, monkeypatch, capsys
):
    """End to end: one run on each of two In-Shop copies with the same file names, one
    image's pixels differing. compare refuses; report will not rank them in one table and,
    allowed to, keeps them as two groups."""
    from vpt_dml import compare, report
    from vpt_dml.run import train

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    a = distinct_images(fake_inshop(tmp_path / "a"))
    b = tmp_path / "b"
    shutil.copytree(a, b)
    one = sorted((b / "Img" / "img").rglob("*.jpg"))[0]
    one.write_bytes(sorted((b / "Img" / "img").rglob("*.jpg"))[1].read_bytes())
    outs = []
    for root in (a, b):
        data = ["data=inshop", f"data.root={root}", "data.strict_counts=false",
                "data.num_workers=0", "data.batch_size=4", "data.samples_per_class=2",
                "data.eval_batch_size=64", "data.recall_ks=[1,2]", "seed=0"]  # fmt: skip
        cfg = compose_config(TINY_BACKBONE + TINY_TRAINER + data, tmp_path / root.name)
        train(cfg)
        outs.append(Path(cfg.paths.output_dir))
    capsys.readouterr()
    assert compare.main([str(outs[0]), str(outs[1])]) == 2
    assert "different test splits" in capsys.readouterr().err
    assert report.main([*map(str, outs), "--out", str(tmp_path / "r")]) == 2
    assert "split_sha256" in capsys.readouterr().err
    assert report.main([*map(str, outs), "--out", str(tmp_path / "r"), "--mixed-protocols"]) == 0
    rows = [r for r in (tmp_path / "r.md").read_text().splitlines() if "| final |" in r]
    assert len(rows) == 2 and all("| final | 1 |" in r for r in rows)  # not one group, n=2
