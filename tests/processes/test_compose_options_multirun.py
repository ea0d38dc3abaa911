"""Group choices run what they name (issue 11): the real multirun
(`python -m ... -m +experiment=... +hparams_search=...`) of the hparams_search sweeps
builds and trains what each job's name says (in process: tests/unit/test_compose_options.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CONF, REPO
from processes import python, run

from tests.unit.test_compose_options import (
    NUM_CLASSES,
    PEFT_NAMES,
    TINY_BACKBONE_12,
    expected_trainable,
)

# -- the real multirun ---------------------------------------------------------------------
PROBE = """
import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from vpt_dml.runs.config_schema import check_config
from vpt_dml.models.method_summary import effective_method
from vpt_dml.module import VPTDMLModule


@hydra.main(version_base="1.3", config_path={conf!r}, config_name="train")
def main(cfg):
    check_config(cfg)
    plain = lambda n: OmegaConf.to_container(n, resolve=True)
    module = VPTDMLModule(plain(cfg.model), plain(cfg.loss), plain(cfg.optim), {classes})
    out = Path(HydraConfig.get().runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(
        {{"model": plain(cfg.model), "method": effective_method(module)}}
    ))


main()
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("search", "expected"),
    [
        ("peft_baselines", [(name, "learned") for name in PEFT_NAMES]),
        (
            "proxy_variants",
            [
                ("vptsp", "learned"),
                ("vptsp", "semantic_mix"),
                ("vptsp", "semantic_gru (gru)"),
                ("vptsp", "semantic_gru (gru_relu)"),
            ],
        ),
    ],
)
def test_real_multirun_jobs_run_what_they_name(tmp_path: Path, search, expected):
    """Hydra's own sweeper and launcher compose every job (no training: the job builds the
    tiny model and records what it trains)."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE.format(conf=str(CONF), classes=NUM_CLASSES))
    sweep_dir = tmp_path / "sweep"
    proc = run(
        python(
            str(probe),
            "-m",
            "+experiment=cub_deep_small",
            f"+hparams_search={search}",
            *TINY_BACKBONE_12,
            f"hydra.sweep.dir={sweep_dir}",
        ),
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [
        json.loads((sweep_dir / str(i) / "probe.json").read_text()) for i in range(len(expected))
    ]
    assert not (sweep_dir / str(len(expected))).exists()
    got = [tuple(r["method"]["label"].split(" / ")) for r in results]
    assert got == expected
    for r in results:
        assert r["method"]["trainable_parameters"] == expected_trainable(r["model"])
