"""verify --duplicates: planted byte-identical images are found (within a split, across
splits as a leak) and nothing else; nothing is removed."""

from __future__ import annotations

from pathlib import Path

from tests.fake_layouts import distinct_images, fake_cub
from vpt_dml.data.verify import main


def test_planted_duplicates_are_found_and_no_others(tmp_path: Path, capsys):
    root = distinct_images(fake_cub(tmp_path, classes=4, per_class=3))
    images = root / "CUB_200_2011" / "images"
    # classes 1-2 train, 3-4 test; the fakes' JPEGs share their header bytes, so a check
    # of anything less than the whole file would find more than these two groups
    within = images / "001.Bird_1" / "Bird_1_0.jpg", images / "002.Bird_2" / "Bird_2_1.jpg"
    leak = images / "002.Bird_2" / "Bird_2_0.jpg", images / "004.Bird_4" / "Bird_4_2.jpg"
    for a, b in (within, leak):
        b.write_bytes(a.read_bytes())
    before = sorted(p.name for p in images.rglob("*.jpg"))

    rc = main(["cub", str(root), "--duplicates"])
    out = capsys.readouterr().out
    assert rc == 1  # the fake's counts are not the official ones; duplicates do not count
    assert "duplicates: 2 group(s) of byte-identical images, 4 files" in out
    assert "  within train: 1 group(s)" in out
    assert "  LEAK: across test/train: 1 group(s) - a test image is also a training image" in out
    lines = [line.strip() for line in out.splitlines() if line.startswith("    ")]
    assert lines == [f"test:{leak[1]} = train:{leak[0]}", f"train:{within[0]} = train:{within[1]}"]
    assert sorted(p.name for p in images.rglob("*.jpg")) == before  # never removed


def test_a_copy_without_duplicates_says_so(tmp_path: Path, capsys):
    root = distinct_images(fake_cub(tmp_path, classes=4, per_class=2))
    main(["cub", str(root), "--duplicates"])
    assert "duplicates: none" in capsys.readouterr().out
