"""How often a SIGTERM to the whole process group ends a tiny run badly.

    python experiments/sigterm_races.py --mode ddp --tries 4
    python experiments/sigterm_races.py --mode workers --tries 4
    python experiments/sigterm_races.py --mode ddp --phase test --tries 12 --spread 2

Each try starts `python -m vpt_dml.run` in its own session, waits for the first
epoch-end last.ckpt, sleeps a random 0..--spread seconds (so the signal lands in a
training step, an evaluation or a checkpoint write), sends SIGTERM to the process group
(as `docker stop`, SLURM and systemd do) and waits up to --wait seconds. A try is good
when the exit code is 143, metrics.json says "interrupted", last.ckpt loads and no
traceback was printed; a try still running after --wait is killed and counted as a hang.
`--phase test`: one epoch, and the signal goes 0..--spread seconds after "`Trainer.fit`
stopped" (the final test, or the writing of metrics.json); a try is good when the exit
code is 143, an `interrupted:` line was printed, metrics.json exists (interrupted, or
finished when the test had ended) and run.lock is gone.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests/processes.py: the suite's one helper for child processes

from tests.processes import child_env, kill_group, python  # noqa: E402

TINY = [
    "model.backbone.name=vit_tiny_patch16_224",
    "model.backbone.pretrained=false",
    "model.backbone.weights=null",
    "++model.backbone.synthetic_pretraining=null",
    "++model.backbone.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
    "model.embed_dim=16",
    "data=synthetic",
    "data.synthetic.num_classes=16",
    "data.synthetic.images_per_class=6",
    "data.synthetic.image_size=32",
    "data.batch_size=4",
    "data.samples_per_class=2",
    "data.eval_batch_size=8",
    "trainer.max_epochs=1000",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.precision=32-true",
    "logger=csv",
    "eval_before_training=false",
]


def mode_overrides(mode: str) -> list[str]:
    if mode == "ddp":
        return ["trainer=ddp_cpu", "data.num_workers=0"]
    if mode == "ddp_workers":
        return ["trainer=ddp_cpu", "data.num_workers=2"]
    return ["trainer.devices=1", "trainer.strategy=auto", "data.num_workers=2"]


def ckpt_loads(path: Path) -> bool:
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=False)
        return True
    except Exception:
        return False


FIT_STOPPED = "`Trainer.fit` stopped"


def one_try(
    mode: str,
    root: Path,
    spread: float,
    wait: float,
    seed: int,
    repo: Path = REPO,
    phase: str = "train",
) -> dict:
    run_dir = root / "run"
    args = (
        TINY
        + mode_overrides(mode)
        + (["trainer.max_epochs=1"] if phase == "test" else [])
        + [
            f"hydra.run.dir={run_dir}",
            f"paths.data_dir={root / 'data'}",
        ]
    )
    env = child_env({"PYTHONPATH": str(repo)}, ddp=True)
    err = open(root / "stderr.txt", "w")
    proc = subprocess.Popen(
        python("-m", "vpt_dml.run", *args),
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=err,
        start_new_session=True,  # its own process group: killpg reaches ranks and workers
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    start = time.monotonic()

    def ready() -> bool:
        if phase == "test":
            return FIT_STOPPED in (root / "stderr.txt").read_text(errors="replace")
        return last.exists()

    while not ready() and proc.poll() is None and time.monotonic() - start < 600:
        time.sleep(0.05)
    delay = random.Random(seed).uniform(0, spread)
    time.sleep(delay)
    sent = time.monotonic()
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        rc = proc.wait(timeout=wait)
        hung = False
    except subprocess.TimeoutExpired:
        rc, hung = None, True
    took = time.monotonic() - sent
    kill_group(proc)  # stragglers (a rank or a worker left behind) go too
    err.close()
    stderr = (root / "stderr.txt").read_text(errors="replace")
    metrics = run_dir / "metrics.json"
    status = json.loads(metrics.read_text()).get("status") if metrics.is_file() else None
    good = (
        rc == 143
        and status == "interrupted"
        and last.is_file()
        and ckpt_loads(last)
        and "Traceback" not in stderr
    )
    if phase == "test":  # too late to stop the test: a finished record is right too
        good = (
            rc == 143
            and status in ("interrupted", "finished")
            and "interrupted: " in stderr
            and not (run_dir / "run.lock").exists()
            and "Traceback" not in stderr
        )
    return {
        "delay_s": round(delay, 2),
        "rc": rc,
        "hung": hung,
        "stop_s": round(took, 1),
        "status": status,
        "traceback": "Traceback" in stderr,
        "good": good,
        "lock_left": (run_dir / "run.lock").exists(),
        "last_line": (stderr.strip().splitlines() or [""])[-1][:200],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["ddp", "ddp_workers", "workers"], required=True)
    p.add_argument("--tries", type=int, default=4)
    p.add_argument("--spread", type=float, default=4.0, help="random delay after last.ckpt (s)")
    p.add_argument("--wait", type=float, default=180.0, help="a try still running after this hung")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phase", choices=["train", "test"], default="train", help="where it lands")
    p.add_argument("--repo", type=Path, default=REPO, help="the checkout whose code runs")
    a = p.parse_args()
    bad = 0
    for i in range(a.tries):
        with tempfile.TemporaryDirectory() as tmp:
            r = one_try(a.mode, Path(tmp), a.spread, a.wait, a.seed * 1000 + i, a.repo, a.phase)
        bad += not r["good"]
        print(json.dumps({"mode": a.mode, "phase": a.phase, "try": i, **r}), flush=True)
    print(f"{a.mode} ({a.phase}): {bad} of {a.tries} tries ended badly", flush=True)


if __name__ == "__main__":
    main()
