"""Every command README.md, docs/*.md and the conf/ headers show is run (tiny settings),
composed (GPU-only), or skipped with a stated reason, by ONE table: HOW_RUN (with the
extractor, in tests/unit/test_documented_commands_table.py, which checks the table).

`python -m vpt_dml.run` commands run through the real CLI (Hydra parses the argv), all in
one worker subprocess (runpy, what `-m` does; one import of torch/lightning for all of
them). The other CLIs run in-process through their `main(argv)`."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF, REPO, TINY_BACKBONE, TINY_DATA, TINY_TRAINER, compose_config
from tests.fake_layouts import fake_cars, fake_cub, fake_inat, fake_inshop, fake_sop, jpeg_bytes
from tests.unit.test_documented_commands_table import DOCS, Doc, entries_for, expand, how

# the presets prompt up to 12 layers: the same tiny ViT, 12 blocks deep
TINY_BACKBONE_12 = [o.replace("depth: 2,", "depth: 12,") for o in TINY_BACKBONE]
TINY_VIT_12 = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 12, "num_heads": 2}
# the run every ckpt_path / export / embed / retrieve command is given
ARTEFACT_PRESET = "cub_deep_small"


def run_args(cmd: str) -> list[str]:
    """The overrides after `vpt_dml.run` (torchrun / srun / python launchers alike)."""
    words = shlex.split(cmd)
    i = words.index("vpt_dml.run")
    return words[i + 1 :]


def split_override(arg: str) -> tuple[str, str]:
    key, _, value = arg.partition("=")
    return key.lstrip("+~"), value


def preset_of(args: list[str]) -> str:
    for a in args:
        k, v = split_override(a)
        if k == "experiment":
            return v
    return "demo"


def sweep_grid(args: list[str]) -> dict[str, str]:
    """Swept key -> its first value: the hparams_search file's grid, then the command line's."""
    grid: dict[str, str] = {}
    for a in args:
        k, v = split_override(a)
        if a.startswith("+hparams_search="):
            params = OmegaConf.load(CONF / "hparams_search" / f"{v}.yaml").hydra.sweeper.params
            grid.update({key: str(val).split(",")[0].strip() for key, val in params.items()})
    for a in args:
        k, v = split_override(a)
        if "=" in a and "," in v and not v.startswith(("[", "{")):
            grid[k] = v.split(",")[0]
    return grid


@dataclass
class Ctx:
    root: Path
    data_dir: Path
    weights: Path
    images: Path
    query: Path
    runs: dict[str, dict] = field(default_factory=dict)  # plan key -> worker result
    export: Path | None = None
    emb: Path | None = None


def plan_key(args: list[str]) -> str:
    return hashlib.sha1("\0".join(args).encode()).hexdigest()[:12]


def tiny_run_args(cmd: str, ctx: Ctx, sweep: bool = False) -> tuple[list[str], dict]:
    """The documented overrides with placeholders made real, then the tiny settings for
    every key the command does not set itself. Also returns what to check afterwards."""
    args = [a for a in run_args(cmd) if a not in ("-m", "--multirun")]
    documented_dir = ""
    preset = preset_of(args)
    info: dict = {"preset": preset, "grid": {}}
    if sweep:
        info["grid"] = sweep_grid(args)
        args = [a for a in args if split_override(a)[0] not in info["grid"] or "," not in a]
        args += [f"{k}={v}" for k, v in info["grid"].items()]
    own = {split_override(a)[0] for a in args}
    cfg = compose_config([a for a in args if not a.startswith("hydra.")], ctx.root / "compose")
    data = cfg.data.name
    info["data"] = data
    out = []
    for a in args:
        k, v = split_override(a)
        if k == "data.root":
            a = f"{a.split('=')[0]}={ctx.data_dir / data}"
        elif k == "paths.data_dir":
            a = f"{k}={ctx.data_dir}"
        elif k == "model.backbone.weights":
            a = f"{a.split('=')[0]}={ctx.weights}"
        elif k == "ckpt_path":
            a = f"{k}={ctx.root / 'artefact' / preset / 'checkpoints' / 'last.ckpt'}"
            info["resume_from"] = preset
        elif k in ("hydra.run.dir", "hydra.sweep.dir"):
            documented_dir = v
            continue  # replaced below
        out.append(a)
    twelve = preset != "demo" or "model.backbone.weights" in own
    backbone = TINY_BACKBONE_12 if twelve else TINY_BACKBONE
    if "model.backbone.weights" in own:
        backbone = [o for o in backbone if not o.startswith("model.backbone.weights")]
    if data == "synthetic":
        data_o = list(TINY_DATA)
    else:
        k = cfg.data.samples_per_class
        data_o = ["data.num_workers=0", "data.eval_batch_size=64", "data.strict_counts=false",
                  f"data.samples_per_class={k}", f"data.batch_size={2 * k}"]  # fmt: skip
    epochs = ["trainer.max_epochs=2"] if "ckpt_path" in own else []
    extra = ["+trainer.limit_train_batches=2", "eval_before_training=false"]
    tiny = [
        o
        for o in backbone + data_o + TINY_TRAINER + extra + epochs
        if split_override(o)[0] not in own
    ]
    if "trainer" in own or any(a.startswith("trainer=") for a in args):  # e.g. trainer=ddp_cpu
        tiny = [o for o in tiny if not o.startswith(("trainer.strategy", "trainer.devices",
                                                     "trainer.accelerator"))]  # fmt: skip
    if "paths.data_dir" not in own:
        tiny.append(f"paths.data_dir={ctx.data_dir}")
    full = (["-m"] if sweep else []) + out + tiny
    key = plan_key(full)
    folder = ctx.root / "runs" / key
    value = str(folder)
    if documented_dir[:1] in ("'", '"'):  # Hydra-quoted (non-ASCII, spaces): kept, and its name
        quote = documented_dir[0]
        folder = folder / Path(documented_dir.strip(quote)).name
        value = f"{quote}{folder}{quote}"
    full.append(f"hydra.sweep.dir={value}" if sweep else f"hydra.run.dir={value}")
    info.update(key=plan_key(full), folder=folder)
    return full, info


# ----------------------------------------------------------------------------------------
# the session: fake data, tiny weights, one worker for every vpt_dml.run, the CLIs' inputs
# ----------------------------------------------------------------------------------------
WORKER = r"""
import contextlib, io, json, runpy, sys, traceback
from hydra.core.global_hydra import GlobalHydra
plan, out = json.load(open(sys.argv[1])), sys.argv[2]
results = {}
for key, argv in plan:
    GlobalHydra.instance().clear()
    sys.argv = ["vpt_dml.run", *argv]
    err, rc = io.StringIO(), 0
    with contextlib.redirect_stderr(err):
        try:
            runpy.run_module("vpt_dml.run", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            rc = 1
            traceback.print_exc()
    results[key] = {"rc": rc, "stderr": err.getvalue()[-6000:], "argv": argv}
    json.dump(results, open(out, "w"))
"""


def run_kind(cmd: str, index: int) -> str:
    """How one expanded command is treated: loops run their first iteration only."""
    kind = how(cmd).kind
    return "compose" if kind in ("run", "sweep", "resume") and index > 0 else kind


def planned(docs: list[Doc], ctx: Ctx) -> list[tuple[str, list[str]]]:
    plan: dict[str, list[str]] = {}
    presets_resumed = set()
    for doc in docs:
        if len(entries_for(doc.text)) != 1:
            continue  # the guard test names it; the other commands still run
        for i, cmd in enumerate(expand(doc.text)):
            if len(entries_for(cmd)) != 1:
                continue
            kind = run_kind(cmd, i) if doc.text.startswith("for ") else how(cmd).kind
            if kind in ("run", "sweep", "resume") and "ddp_cpu" not in cmd:
                try:
                    argv, info = tiny_run_args(cmd, ctx, sweep=kind == "sweep")
                except Exception:  # does not compose: that command's own test says why
                    continue
                plan[info["key"]] = argv
                if kind == "resume":
                    presets_resumed.add(info["preset"])
    artefacts = []
    for preset in sorted(presets_resumed | {ARTEFACT_PRESET}):
        base = f"python -m vpt_dml.run +experiment={preset} model.backbone.weights=W"
        argv, _ = tiny_run_args(base, ctx)
        argv[-1] = f"hydra.run.dir={ctx.root / 'artefact' / preset}"
        artefacts.append((f"artefact:{preset}", argv))
    return artefacts + list(plan.items())


def write_weights(path: Path) -> Path:
    import timm
    from safetensors.torch import save_file

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_VIT_12)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def session(tmp_path_factory) -> Ctx:
    root = tmp_path_factory.mktemp("documented")
    data = root / "data"
    fake_cub(data / "cub", per_class=2)
    fake_cars(data / "cars", per_class=(2,))
    fake_sop(data / "sop")
    fake_inshop(data / "inshop")
    fake_inat(data / "inat")
    images = root / "images"
    images.mkdir()
    for i in range(8):
        (images / f"img_{i}.jpg").write_bytes(jpeg_bytes(i + 1, (40, 32)))
    query = root / "query.jpg"
    query.write_bytes(jpeg_bytes(3, (40, 32)))
    ctx = Ctx(root, data, write_weights(root / "tiny_vit.safetensors"), images, query)

    plan = planned(DOCS, ctx)
    (root / "plan.json").write_text(json.dumps(plan))
    from tests.processes import child_env, python, run

    env = child_env({"PYTHONPATH": str(REPO)})
    env["OMP_NUM_THREADS"] = "1"  # tiny matrices: one thread is faster on a shared machine
    proc = run(
        python("-c", WORKER, str(root / "plan.json"), str(root / "results.json")),
        cwd=root,
        env=env,
        timeout=900,
    )
    results = root / "results.json"
    ctx.runs = json.loads(results.read_text()) if results.exists() else {}
    assert len(ctx.runs) == len(plan), proc.stderr[-3000:]

    from vpt_dml import embed
    from vpt_dml.serving.exported import export_run

    art = ctx.runs[f"artefact:{ARTEFACT_PRESET}"]
    assert art["rc"] == 0, art["stderr"]
    ctx.export = root / "model.safetensors"
    export_run(root / "artefact" / ARTEFACT_PRESET, ctx.export)
    ctx.emb = root / "emb"
    assert embed.main([str(ctx.export), str(images), str(ctx.emb), "--no-progress"]) == 0
    return ctx


# ----------------------------------------------------------------------------------------
# checks per kind
# ----------------------------------------------------------------------------------------
def check_metrics(path: Path) -> dict:
    result = json.loads(path.read_text())
    for name, value in result["metrics"].items():
        assert 0.0 <= value <= 1.0, (name, value)
    assert "recall@1" in result["metrics"]
    return result


def run_result(cmd: str, ctx: Ctx, sweep: bool) -> tuple[dict, dict]:
    argv, info = tiny_run_args(cmd, ctx, sweep=sweep)
    res = ctx.runs[info["key"]]
    assert res["rc"] == 0, f"{cmd}\n-> vpt_dml.run {shlex.join(argv)}\n{res['stderr']}"
    return info, res


def check_run(cmd: str, ctx: Ctx) -> None:
    info, _ = run_result(cmd, ctx, sweep=False)
    result = check_metrics(info["folder"] / "metrics.json")
    prov = result["provenance"]
    assert prov["dataset"]["name"] == info["data"]
    assert prov["task_name"] == info["preset"]
    if "model.backbone.weights=" in cmd:  # the file given is the one loaded, strictly
        w = prov["backbone"]
        assert str(ctx.weights) in json.dumps(w), w
    if info["data"] != "synthetic":  # the real loader read the fake copy of the layout
        assert prov["dataset"]["root"] == str(ctx.data_dir / info["data"])


def check_resume(cmd: str, ctx: Ctx) -> None:
    info, _ = run_result(cmd, ctx, sweep=False)
    result = check_metrics(info["folder"] / "metrics.json")
    first = json.loads((ctx.root / "artefact" / info["resume_from"] / "metrics.json").read_text())
    # one more epoch on top of the checkpoint's: the steps continue from where it stopped
    assert result["provenance"]["global_step"] == 2 * first["provenance"]["global_step"]


def check_sweep(cmd: str, ctx: Ctx) -> None:
    info, _ = run_result(cmd, ctx, sweep=True)
    jobs = sorted(info["folder"].rglob("metrics.json"))
    assert len(jobs) == 1, jobs
    result = check_metrics(jobs[0])
    overrides = result["provenance"]["overrides"]
    for key, value in info["grid"].items():  # the job ran the grid's value
        assert any(split_override(o) == (key, value) for o in overrides), (key, value, overrides)


def check_ddp_cpu(cmd: str, ctx: Ctx) -> None:
    from tests.conftest import run_cli
    from tests.processes import free_port

    argv, info = tiny_run_args(cmd, ctx)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    res = run_cli(argv, cwd=ctx.root, env=env, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    result = check_metrics(info["folder"] / "metrics.json")
    assert result["provenance"]["world_size"] == 2


def check_compose(cmd: str, ctx: Ctx) -> None:
    from vpt_dml.runs.config_schema import check_config
    from vpt_dml.runs.provenance import cfg_without_hydra

    args = [a for a in run_args(cmd) if a not in ("-m", "--multirun")]
    cfg = compose_config(args, ctx.root / "compose")
    check_config(cfg)
    OmegaConf.to_container(cfg_without_hydra(cfg), resolve=True)
    for a in args:  # every plain `key=value` lands where the docs say
        k, v = split_override(a)
        if "." in k and "/" not in k and not k.startswith("hydra.") and "," not in v:
            got = OmegaConf.select(cfg, k)
            assert not OmegaConf.is_config(got) and str(got) == v, (a, got)
    if re.search(r" trainer=ddp\b", " " + " ".join(args)):
        assert cfg.trainer.strategy._target_.endswith("DDPStrategy")
        assert cfg.trainer.accelerator == "gpu"


def cli_argv(cmd: str, tool: str, ctx: Ctx, out: Path) -> list[str]:
    """Positional paths by role (what the tool reads: the tiny artefacts; what it writes:
    tmp), flags kept as documented; `--device cuda` -> cpu (no GPU here)."""
    words = shlex.split(cmd)[3:]
    roles = {
        "export": [ctx.root / "artefact" / ARTEFACT_PRESET, out / "model.safetensors"],
        "embed": [ctx.export, ctx.images, out / "emb"],
        "retrieve": [ctx.export, ctx.query, ctx.emb],
        "report": [sweep_folder(ctx)] * 8,
        "index": ["build", ctx.emb, out / "gallery.faiss"],
        "evaluate": [ctx.export],
    }
    if tool == "retrieve" and any(w.endswith(".faiss") for w in words):  # a saved index
        from vpt_dml.index import main as index_main

        assert index_main(["build", str(ctx.emb), str(out / "gallery.faiss")]) == 0
        roles["retrieve"][2] = out / "gallery.faiss"
    values = ("--top-k", "--checkpoint", "--batch-size", "--chunk-size", "--device", "--kind")
    values += ("--nlist", "--nprobe", "--m", "--ef-search", "--ef-construction", "--ks")
    argv, pos, i = [], 0, 0
    while i < len(words):
        w = words[i]
        if w.startswith("--"):
            argv.append(w)
            if w in values:
                i += 1
                argv.append("cpu" if w == "--device" else words[i])
            elif w in ("--out", "--backbone-weights", "--onnx", "--gallery-png"):
                i += 1
                suffix = Path(words[i]).suffix  # .csv / .json: the format retrieve writes
                path = {"--onnx": out / "model.onnx", "--gallery-png": out / "sheet.png"}.get(
                    w, out / f"out{suffix}"
                )
                argv.append(str(ctx.weights if w == "--backbone-weights" else path))
            elif w in ("--queries", "--gallery"):
                i += 1
                argv.append(str(labelled_folders(ctx)[w == "--gallery"]))
        elif tool == "data.verify":
            dataset = w if pos == 0 and w in ("cub", "cars", "sop", "inshop", "inat") else "cub"
            argv.append(dataset if pos == 0 else str(ctx.data_dir / argv[0]))
            pos += 1
        else:
            argv.append(str(roles[tool][pos]))
            pos += 1
        i += 1
    if tool == "retrieve" and "--out" not in argv:
        argv += ["--out", str(out / "retrieval.json")]
    if tool in ("embed", "retrieve", "evaluate"):
        argv.append("--no-progress")
    return argv


def labelled_folders(ctx: Ctx) -> tuple[Path, Path]:
    """The JPEGs as two classes (even / odd), the first of each class a query."""
    q, g = ctx.root / "labelled" / "queries", ctx.root / "labelled" / "gallery"
    if not q.is_dir():
        for i, f in enumerate(sorted(ctx.images.glob("*.jpg"))):
            dest = (q if i < 2 else g) / f"class{i % 2}" / f.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read_bytes())
    return q, g


def sweep_folder(ctx: Ctx) -> Path:
    folders = [Path(r["argv"][-1].split("=", 1)[1]) for r in ctx.runs.values()
               if r["argv"][0] == "-m" and r["rc"] == 0]  # fmt: skip
    assert folders, "no documented sweep finished in this session: nothing to report on"
    return folders[0]


def check_cli(cmd: str, tool: str, ctx: Ctx, out: Path, capsys) -> None:
    import importlib

    main = importlib.import_module(f"vpt_dml.{tool}").main
    argv = cli_argv(cmd, tool, ctx, out)
    rc = main(argv)
    stdout, stderr = capsys.readouterr()
    assert "error:" not in stderr, (argv, stderr)
    if tool == "data.verify":
        # the fake copy is small: count mismatches are the only problems it may report
        assert rc in (0, 1), stderr
        problems = [line for line in stdout.splitlines() if line.startswith(("missing", "cannot"))]
        assert not problems and f"{argv[0]} at {argv[1]}" in stdout, stdout
        return
    assert rc == 0, (argv, stdout, stderr)
    if tool == "export" and "--onnx" in argv:
        from vpt_dml.serving.onnx_export import run_onnx

        got = run_onnx(Path(argv[argv.index("--onnx") + 1]), np.zeros((2, 3, 32, 32), np.float32))
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=0, atol=1e-5)
    elif tool == "export":
        from vpt_dml.serving.exported import load_exported

        assert load_exported(Path(argv[1])).embedder is not None
    elif tool == "index":
        from vpt_dml.serving.index import read

        assert read(Path(argv[2])).index.ntotal == len(list(ctx.images.glob("*.jpg")))
    elif tool == "evaluate":
        assert "recall@1" in stdout, stdout
    elif tool == "retrieve" and argv[argv.index("--out") + 1].endswith(".csv"):
        import csv

        with open(argv[argv.index("--out") + 1]) as f:
            rows = list(csv.DictReader(f))
        k = int(argv[argv.index("--top-k") + 1]) if "--top-k" in argv else 5
        assert [r["rank"] for r in rows] == [str(r) for r in range(1, min(k, 8) + 1)], rows
    elif tool == "embed":
        emb = np.load(Path(argv[2]) / "embeddings.npy")
        assert emb.shape[0] == len(list(ctx.images.glob("*.jpg")))
    elif tool == "retrieve":
        saved = json.loads(Path(argv[argv.index("--out") + 1]).read_text())
        k = int(argv[argv.index("--top-k") + 1]) if "--top-k" in argv else 5
        assert [r["query"] for r in saved] == [str(ctx.query)]
        assert len(saved[0]["neighbours"]) == min(k, len(list(ctx.images.glob("*.jpg"))))
    elif tool == "report":  # one row per job of the sweep it was given
        table = (out / "out.md") if "--out" in argv else Path(argv[0]) / "report.md"
        jobs = len(list(Path(argv[0]).rglob("metrics.json")))
        assert table.read_text().count("\n|") >= jobs + 1, table.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS, ids=[d.text[:90] for d in DOCS])
def test_documented_command(doc: Doc, session: Ctx, tmp_path: Path, capsys) -> None:
    entry = how(doc.text)
    if entry.kind == "skip":
        pytest.skip(f"{doc.where}: {entry.why}")
    if entry.kind == "delegated":
        file, name = entry.tool.split("::")
        assert re.search(rf"^def {name}\(", (REPO / file).read_text(), re.M), entry.tool
        return
    loop = doc.text.startswith("for ")
    for i, cmd in enumerate(expand(doc.text)):
        kind = run_kind(cmd, i) if loop else how(cmd).kind
        if kind == "run":
            check_run(cmd, session)
        elif kind == "resume":
            check_resume(cmd, session)
        elif kind == "sweep":
            check_sweep(cmd, session)
        elif kind == "compose":
            check_compose(cmd, session)
        elif kind == "ddp_cpu":
            check_ddp_cpu(cmd, session)
        elif kind == "cli":
            check_cli(cmd, how(cmd).tool, session, tmp_path / str(i), capsys)
        else:  # skip / delegated inside a loop or recipe: its own entry says why
            assert kind in ("skip", "delegated"), kind
