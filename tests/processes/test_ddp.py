"""2-process DDP on CPU (gloo) through `python -m vpt_dml.run trainer=ddp_cpu`.

Two launches: k=1 with data.sampler=reference (issue 32: the ranks train on their turns of
the reference implementation's batches) and k=2 with proxy dropout and the class-balanced
sampler. Checks: the run finishes; both ranks end with byte-identical H and class-prompt
store; the store's per-row step counts are the classes each step drew, counted once
whichever rank drew them; the DDP run's test metrics equal a single-process evaluation of
its final checkpoint, on an evaluation set that does not divide by the world size (the
sampler pads); torchrun's launch of the k=1 settings equals Lightning's.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import REPO, TINY_BACKBONE, compose_config, run_cli
from processes import child_env, free_port, python, run

from vpt_dml.data.reference_sampler import ReferenceBatchSampler
from vpt_dml.module import VPTDMLModule
from vpt_dml.train import build_datamodule

# 8 train and 9 test classes of 7 images: 63 test images over 2 ranks, so the evaluation
# sampler pads a rank with a duplicate that the gather must drop (issue 19)
TRAIN_CLASSES, TEST_CLASSES, IMAGES_PER_CLASS, BATCH = 8, 9, 7, 4
# k=1 draws the reference implementation's batches (4 of 8 classes a rank, so classes
# meet across ranks); k=2 the class-balanced sampler's (distinct classes across ranks)
SAMPLER = {1: ["data.sampler=reference", "seed=3"], 2: []}


def ddp_overrides(tmp_path: Path, k: int, dropout: float) -> list[str]:
    return TINY_BACKBONE + [
        "data=synthetic",
        f"data.synthetic.num_classes={TRAIN_CLASSES + TEST_CLASSES}",  # the first half train
        f"data.synthetic.images_per_class={IMAGES_PER_CLASS}",
        "data.synthetic.image_size=32",
        f"data.batch_size={BATCH}",
        f"data.samples_per_class={k}",
        "data.num_workers=0",
        "data.eval_batch_size=16",  # several eval batches per rank: sharding + padding run
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "logger=csv",
        "model.proxy.class_prompt_store=host",
        f"model.proxy.dropout={dropout}",  # > 0: the fold's dropout must agree across ranks
        "model.proxy.class_prompts={num: 2, depth: 2, step: 0}",
        "eval_before_training=false",
        f"paths.data_dir={tmp_path / 'data'}",
        *SAMPLER[k],
    ]


def single_process_test(cfg, ckpt: Path) -> dict[str, float]:
    dm = build_datamodule(cfg)
    dm.load()
    module = VPTDMLModule.load_from_checkpoint(ckpt, map_location="cpu")
    from vpt_dml.models.backbone import data_config

    pre = data_config(module.embedder.backbone.vit)
    dm.image_size, dm.mean, dm.std = pre["image_size"], pre["mean"], pre["std"]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    out = trainer.test(module, datamodule=dm, verbose=False)[0]
    return {k.removeprefix("test/"): float(v) for k, v in out.items()}


def ddp_args(root: Path, k: int, dropout: float) -> list[str]:
    """trainer=ddp_cpu with each rank's final state saved to root/rank_state."""
    return ddp_overrides(root, k, dropout) + [
        "trainer=ddp_cpu",
        "+callbacks.save_rank_state._target_=vpt_dml.runs.callbacks.rank_state.SaveRankState",
        f"+callbacks.save_rank_state.dirpath={root / 'rank_state'}",
    ]


@pytest.fixture(scope="module")
def lightning_ddp(tmp_path_factory):
    """Lightning's own 2-process launch (`trainer=ddp_cpu`) of the settings (k, dropout),
    run once per module: its root folder (run/, rank_state/, data/)."""
    runs: dict[tuple, Path] = {}

    def launched(k: int, dropout: float) -> Path:
        if (k, dropout) not in runs:
            root = tmp_path_factory.mktemp(f"ddp_k{k}")
            proc = run_cli(
                [*ddp_args(root, k, dropout), f"hydra.run.dir={root / 'run'}"],
                cwd=REPO,
                env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())},
                timeout=400,
            )
            assert proc.returncode == 0, proc.stderr[-4000:]
            runs[(k, dropout)] = root
        return runs[(k, dropout)]

    return launched


@pytest.mark.both_cores
@pytest.mark.slow
@pytest.mark.parametrize(("k", "dropout"), [(1, 0.0), (2, 0.1)])
def test_ddp_cpu_ranks_agree_and_match_single_process_eval(lightning_ddp, k: int, dropout: float):
    root = lightning_ddp(k, dropout)
    run_dir, state_dir = root / "run", root / "rank_state"
    overrides = ddp_overrides(root, k, dropout)

    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["provenance"]["world_size"] == 2
    split = result["provenance"]["dataset"]["counts"]
    assert split["test_classes"] == TEST_CLASSES and (TEST_CLASSES * IMAGES_PER_CLASS) % 2 == 1

    r0 = torch.load(state_dir / "rank0.pt")
    r1 = torch.load(state_dir / "rank1.pt")
    assert r0["memory"].numpy().tobytes() == r1["memory"].numpy().tobytes()
    assert len(r0["store"]) == len(r1["store"]) > 0
    for a, b in zip(r0["store"], r1["store"]):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert (
            a.contiguous().view(torch.uint8).numpy().tobytes()
            == b.contiguous().view(torch.uint8).numpy().tobytes()
        )

    # per-row step counts (last state tensor): the classes each step drew, counted once,
    # whichever rank drew them
    cfg = compose_config(overrides, root)
    counts = r0["store"][-1]
    if k == 1:  # the one-device epoch's reference batches, the ranks taking turns
        labels = build_datamodule(cfg).load().train.labels
        batches = ReferenceBatchSampler(labels, BATCH, k, seed=3).epoch_batches(0)
        steps = [batches[i : i + 2] for i in range(0, len(batches), 2)]
        want = np.zeros(labels.max() + 1, dtype=np.int64)
        for step in steps:
            want[np.unique(labels[np.concatenate(step)])] += 1
        assert any(len(set(labels[a]) & set(labels[b])) for a, b in steps)  # classes meet
        assert counts.long().tolist() == want.tolist()
    else:  # class-balanced: each step draws 2 x BATCH/k distinct classes
        steps_per_epoch = TRAIN_CLASSES * IMAGES_PER_CLASS // (2 * BATCH)
        assert int(counts.sum()) == steps_per_epoch * 2 * (BATCH // k)
        assert int(counts.max()) <= steps_per_epoch

    single = single_process_test(cfg, run_dir / "checkpoints" / "last.ckpt")
    ddp = result["metrics"]
    shared = [key for key in ddp if key in single]
    assert "recall@1" in shared
    for key in shared:
        assert single[key] == pytest.approx(ddp[key], abs=1e-6), key


@pytest.mark.both_cores
@pytest.mark.slow
def test_torchrun_two_processes_equal_lightnings_ddp_cpu_launch(lightning_ddp, tmp_path: Path):
    """DDP started by torchrun (as srun starts it: the processes exist before Python runs)
    trains as Lightning's own `trainer=ddp_cpu` launch of the same settings does: same
    metrics, one run folder, one metrics.json, no lock left behind."""
    spawned = lightning_ddp(1, 0.0) / "run"
    # torchrun with no hydra.run.dir: both workers must agree on the default folder
    cwd = tmp_path / "elastic"
    cwd.mkdir()
    env = child_env()
    env.pop("VPT_RUN_STAMP", None)
    launched = run(
        python(
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=2",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
            "-m",
            "vpt_dml.run",
            *(  # the same generated images as Lightning's launch; its own rank_state
                a
                if not a.startswith("paths.data_dir=")
                else f"paths.data_dir={spawned.parent}/data"
                for a in ddp_args(tmp_path, 1, 0.0)
            ),
        ),
        cwd=cwd,
        env=env,
        timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    folders = list((cwd / "outputs" / "demo" / "runs").iterdir())
    assert len(folders) == 1, folders  # one run folder for both processes
    run_dir = folders[0]
    assert [p.relative_to(cwd) for p in cwd.rglob("metrics.json")] == [
        run_dir.relative_to(cwd) / "metrics.json"
    ]
    assert not (run_dir / "run.lock").exists()

    a = json.loads((spawned / "metrics.json").read_text())
    b = json.loads((run_dir / "metrics.json").read_text())
    assert a["provenance"]["world_size"] == b["provenance"]["world_size"] == 2
    assert b["status"] == "finished"
    assert a["metrics"].keys() == b["metrics"].keys()
    for key, value in a["metrics"].items():
        assert b["metrics"][key] == pytest.approx(value, abs=1e-6), key
