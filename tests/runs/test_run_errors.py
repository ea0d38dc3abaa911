"""Run-level doors: every bad ckpt_path, an output folder that cannot be written and a
wrong-type override end in exit 2 and exactly one `error:` line, with no traceback."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, cli_in_process, compose_config, tiny_overrides

from vpt_dml.checkpoints import load_checkpoint
from vpt_dml.errors import UserError
from vpt_dml.run import train


@pytest.fixture
def real_ckpt(finished_run: Path) -> Path:
    """last.ckpt of the suite's finished tiny run (task_name=demo, model.embed_dim=16)."""
    return finished_run / "checkpoints" / "last.ckpt"


def bad_files(root: Path, real: Path) -> dict[str, Path]:
    """One file per way a ckpt_path can be wrong (the real checkpoint aside)."""
    truncated = root / "truncated.ckpt"
    truncated.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    text = root / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    refused = root / "refused.ckpt"
    # a checkpoint-shaped file whose pickle names a callable: unpickling it could run code
    torch.save({"state_dict": {}, "hook": os.system}, refused)
    plain = root / "plain.ckpt"
    with plain.open("wb") as f:
        pickle.dump({"state_dict": {}}, f, protocol=4)
    return {
        "missing": root / "missing.ckpt",
        "truncated": truncated,
        "not_a_checkpoint": text,
        "refused_pickle": refused,
        "plain_pickle": plain,
    }


EXPECTED = {
    "missing": "does not exist",
    "truncated": "is truncated",
    "not_a_checkpoint": "is not a PyTorch checkpoint",
    "refused_pickle": "was refused: it holds Python objects (posix.system)",
    "plain_pickle": "was refused: it is a pickle that safe loading",
}


def one_error_line(res, expected: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert expected in errors[0], errors[0]
    return errors[0]


def cli(tmp_path: Path, *extra: str):
    return cli_in_process(
        [
            *tiny_overrides(*extra),
            f"paths.data_dir={tmp_path / 'data'}",
            *(
                []
                if any(e.startswith("hydra.run.dir=") for e in extra)
                else [f"hydra.run.dir={tmp_path / 'run'}"]
            ),
        ],
        cwd=REPO,
    )


def test_every_bad_checkpoint_kind_is_one_line_in_process(real_ckpt: Path, tmp_path: Path):
    files = bad_files(tmp_path, real_ckpt)
    for kind, path in files.items():
        with pytest.raises(UserError, match=re.escape(EXPECTED[kind])):
            load_checkpoint(path)
    bare = tmp_path / "bare.pt"
    torch.save({"w": torch.zeros(2)}, bare)
    with pytest.raises(UserError, match="bare weights"):
        load_checkpoint(bare)
    # a real checkpoint needs nothing beyond torch's own weights_only allow-list
    assert torch.serialization.get_unsafe_globals_in_checkpoint(real_ckpt) == []
    ckpt = load_checkpoint(real_ckpt)
    assert "state_dict" in ckpt and "optimizer_states" in ckpt


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["missing", "truncated", "not_a_checkpoint", "refused_pickle"])
def test_bad_ckpt_path_is_one_line(real_ckpt: Path, tmp_path: Path, kind: str):
    path = bad_files(tmp_path, real_ckpt)[kind]
    line = one_error_line(cli(tmp_path, f"ckpt_path={path}"), EXPECTED[kind])
    assert str(path) in line


def test_checkpoint_of_another_model_is_refused_by_its_config_first(real_ckpt: Path, tmp_path):
    cfg = compose_config(tiny_overrides("model.embed_dim=8", f"ckpt_path={real_ckpt}"), tmp_path)
    with pytest.raises(UserError, match="model.embed_dim=8 here but 16 in the checkpoint"):
        train(cfg)


@pytest.mark.slow
def test_checkpoint_of_another_model_names_tensor_shapes_and_preset(real_ckpt: Path, tmp_path):
    # a checkpoint without a stored config (older vpt_dml): the built model is the check
    ckpt = torch.load(real_ckpt, weights_only=True)
    del ckpt["callbacks"]["ExactResume"]["run"]["config"]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    res = cli(tmp_path, "model.embed_dim=8", f"ckpt_path={old}")
    line = one_error_line(res, "was made for another model")
    # the head is the first tensor that differs: 16-d in the checkpoint, 8-d here
    assert "embedder.head.fc.weight is [16, 32] in the checkpoint but [8, 32]" in line
    assert "task_name=demo" in line and "embed_dim 16" in line


@pytest.mark.slow
def test_output_folder_under_a_file_is_one_line(tmp_path: Path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    res = cli(tmp_path, f"hydra.run.dir={blocker / 'run'}")
    one_error_line(res, f"{blocker} is a file, not a folder")
    assert blocker.read_text() == "x"


@pytest.mark.slow
def test_unwritable_output_folder_is_one_line(tmp_path: Path):
    if os.geteuid() != 0:
        target = tmp_path / "locked"
        target.mkdir()
        target.chmod(0o500)
        run_dir = target / "run"
    elif Path("/sys").is_dir():  # root writes anywhere but into sysfs
        run_dir = Path("/sys/vpt_dml_test/run")
    else:
        pytest.skip("no unwritable place for root on this system")
    res = cli(tmp_path, f"hydra.run.dir={run_dir}")
    one_error_line(res, "give a folder you can write to")
    assert not run_dir.exists()


@pytest.mark.slow
def test_wrong_type_override_names_key_and_type(tmp_path: Path):
    # the config schema (config_checks) answers first; run.check_types is the net behind it
    res = cli(tmp_path, "trainer.max_epochs=abc")
    line = one_error_line(res, "trainer.max_epochs='abc'")
    assert "integer" in line


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path: Path):
    res = cli(tmp_path, f"ckpt_path={tmp_path / 'missing.ckpt'}", "debug=true")
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "UserError" in res.stderr
    assert not any(line.startswith("error:") for line in res.stderr.splitlines())


@pytest.mark.parametrize(
    "override", ["trainer.max_epochs=0", "trainer.max_steps=0", "trainer.limit_train_batches=0"]
)
def test_a_run_that_trains_nothing_is_refused_not_recorded_as_finished(tmp_path, override):
    """Issue 28 item 9: trainer.max_epochs=0 wrote metrics.json "finished" with the untrained
    model's numbers as the trained ones; now one line, before the run folder is used."""
    cfg = compose_config(tiny_overrides(override, "eval_before_training=false"), tmp_path)
    with pytest.raises(UserError, match=rf"trainer\.{override.split('.')[1]} trains nothing"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "metrics.json").exists()
