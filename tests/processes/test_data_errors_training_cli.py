"""Bad dataset copies through the command line (a child process): a corrupt image met
during training ends the run with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, run_cli, tiny_overrides

from tests.unit.test_data_errors import truncate
from vpt_dml.data.synthetic import write_synthetic_cub


@pytest.mark.slow
def test_cli_corrupt_image_during_training_ends_with_one_line(tmp_path: Path):
    data_dir = tmp_path / "data"
    root = write_synthetic_cub(
        data_dir / "synthetic", num_classes=8, images_per_class=6, image_size=32, seed=0
    )
    bad = sorted((root / "CUB_200_2011" / "images").rglob("*.jpg"))[0]
    truncate(str(bad))
    args = tiny_overrides(
        f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'run'}", "data.num_workers=1"
    )
    proc = run_cli(args, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot decode image {bad}") and "skip_broken" in last
    assert "Traceback" not in proc.stderr
