"""The protocol stamp (vpt_dml/evaluation/protocol.py): what makes two runs' numbers comparable."""

from __future__ import annotations

from types import SimpleNamespace

from vpt_dml.evaluation.protocol import differing_fields, records_sha256, stamp_of


def recs(paths, labels):
    return SimpleNamespace(paths=list(paths), labels=list(labels))


def test_split_hash_sees_images_labels_and_roles_not_order_or_root() -> None:
    q = recs(["/a/x/1.jpg", "/a/x/2.jpg", "/a/y/3.jpg"], [0, 0, 1])
    base = records_sha256(q, root="/a")
    shuffled = recs(["/a/y/3.jpg", "/a/x/1.jpg", "/a/x/2.jpg"], [1, 0, 0])
    moved = recs(["/b/x/1.jpg", "/b/x/2.jpg", "/b/y/3.jpg"], [0, 0, 1])
    assert records_sha256(shuffled, root="/a") == base
    assert records_sha256(moved, root="/b") == base  # the dataset copied elsewhere
    assert records_sha256(recs(q.paths, [0, 1, 1]), root="/a") != base
    as_gallery = records_sha256(recs(q.paths[:2], [0, 0]), recs(q.paths[2:], [1]), root="/a")
    assert as_gallery != base  # same images, other query / gallery roles


def test_stamp_changes_with_each_field() -> None:
    fields = {"split_sha256": "s", "image_resolution": 224, "decode": "fast",
              "selection": "test", "map_at_r": "m", "embedding": "e", "ks": [1, 2]}  # fmt: skip
    for key, other in [("image_resolution", 256), ("decode", "torchvision"), ("ks", [1, 10])]:
        assert stamp_of({**fields, key: other}) != stamp_of(fields)
        assert differing_fields([fields, {**fields, key: other}]) == [key]


def test_a_run_that_skipped_a_test_image_has_another_stamp(tmp_path, monkeypatch) -> None:
    """Issue 28 item 9: the stamp follows the images actually evaluated. One datamodule,
    one split hash: stamped before its test set ran (nothing skipped yet, as a clean run
    of these files would be) and after (one undecodable test image skipped)."""
    from tests.fake_layouts import distinct_images, fake_cub
    from vpt_dml.data.datamodule import RetrievalDataModule
    from vpt_dml.evaluation.protocol import protocol

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = distinct_images(fake_cub(tmp_path / "cub", classes=4, per_class=3))
    bad = sorted((root / "CUB_200_2011" / "images").rglob("*.jpg"))[-1]  # a test image
    bad.write_bytes(b"not a jpeg")
    stamps = []
    for _ in range(2):  # two runs that skipped the same image are comparable
        dm = RetrievalDataModule(
            name="cub", root=str(root), num_workers=0, strict_counts=False, skip_broken=True
        )
        dm.setup("test")
        result = {"provenance": {"dataset": dm.count_report}}
        whole = protocol(dm, result)
        labels = [dm.test_set[i][1] for i in range(len(dm.test_set))]  # the test loop's reads
        assert labels.count(-1) == 1
        evaluated = protocol(dm, result)
        assert evaluated["skipped_test_images"] == 1 and "skipped_test_images" not in whole
        assert evaluated["split_sha256"] != whole["split_sha256"]
        assert evaluated["stamp"] != whole["stamp"]
        stamps.append(evaluated["stamp"])
    assert stamps[0] == stamps[1]
