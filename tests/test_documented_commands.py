"""Every command README.md, docs/*.md and the conf/ headers show is run (tiny settings),
composed (GPU-only), or skipped with a stated reason, by ONE table: HOW_RUN.

A documented command that matches no entry (or two) fails
`test_every_documented_command_has_exactly_one_table_entry`, naming the command and HOW_RUN.

`python -m vpt_dml.run` commands run through the real CLI (Hydra parses the argv), all in
one worker subprocess (runpy, what `-m` does; one import of torch/lightning for all of
them). The other CLIs run in-process through their `main(argv)`.
"""

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

# the presets prompt up to 12 layers: the same tiny ViT, 12 blocks deep
TINY_BACKBONE_12 = [o.replace("depth: 2,", "depth: 12,") for o in TINY_BACKBONE]
TINY_VIT_12 = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 12, "num_heads": 2}
# the run every ckpt_path / export / embed / retrieve command is given
ARTEFACT_PRESET = "cub_deep_small"

# ----------------------------------------------------------------------------------------
# 1. extraction
# ----------------------------------------------------------------------------------------
COMMAND = re.compile(
    r"(?:python3? -m vpt_dml\.|python3? experiments/|torchrun |srun |make |for \w+ in "
    r"|eval \"\$\(python3? -m vpt_dml\.)"
)


@dataclass(frozen=True)
class Doc:
    text: str  # one line: continuations joined, trailing comment stripped
    where: str  # file:line

    @property
    def id(self) -> str:
        return self.text


def strip_comment(line: str) -> str:
    """Drop a trailing `# comment` (a # after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def join_shell(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Shell lines -> commands: backslash continuations and `for ...; done` loops joined."""
    out: list[tuple[int, str]] = []
    buf, start, loop, cont = "", 0, False, False
    for no, raw in lines:
        line = strip_comment(raw).strip()
        if not line and not buf:
            continue
        if not buf:
            start, loop = no, line.startswith("for ")
        elif loop and not cont and not buf.endswith(("do", ";")):
            buf += "; "  # a new line of the loop's body is a new command
        else:
            buf += " "
        cont = line.endswith("\\")
        buf += line.removesuffix("\\").strip()
        if cont or (loop and not re.search(r"\bdone$", buf)):
            continue
        out.append((start, " ".join(buf.split())))
        buf = ""
    if buf:
        out.append((start, " ".join(buf.split())))
    return out


def _inline_command(span: str) -> str | None:
    span = " ".join(span.split())
    m = COMMAND.match(span)
    return span if m else None


def markdown_commands(path: Path) -> list[Doc]:
    """```bash/sh/shell blocks, and inline `code` spans that start with a command."""
    docs: list[Doc] = []
    rel = path.relative_to(REPO)
    fence: str | None = None
    block: list[tuple[int, str]] = []
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            if fence is None:
                fence = line.strip()[3:].strip() or "text"
                block = []
            else:
                if fence in ("bash", "sh", "shell", "console"):
                    for start, cmd in join_shell(block):
                        cmd = cmd.removeprefix("$ ")
                        if COMMAND.match(cmd):
                            docs.append(Doc(cmd, f"{rel}:{start}"))
                fence = None
            continue
        if fence is not None:
            block.append((no, line))
            continue
        for span in re.findall(r"`([^`]+)`", line):
            cmd = _inline_command(span)
            if cmd:
                docs.append(Doc(cmd, f"{rel}:{no}"))
    # an inline span wrapped over two lines (`python -m ... \n ...`)
    prose = re.sub(
        r"```.*?```", lambda m: "\n" * m.group().count("\n"), path.read_text(), flags=re.S
    )
    for m in re.finditer(r"`([^`\n]+\n[^`\n]+)`", prose):
        cmd = _inline_command(m.group(1))
        if cmd:
            docs.append(Doc(cmd, f"{rel}:{prose[: m.start()].count(chr(10)) + 1}"))
    return docs


def yaml_commands(path: Path) -> list[Doc]:
    """Commands in comment lines: `# Run: python -m ...`, `#   torchrun ... \\`, and
    `#   ... +more=args` (the command above it, extended)."""
    rel = path.relative_to(REPO)
    docs: list[Doc] = []
    comment: list[tuple[int, str]] = []
    for no, line in enumerate(path.read_text().splitlines(), 1):
        s = line.strip()
        if s.startswith("#") and not s.startswith("#SBATCH"):
            comment.append((no, s.lstrip("#").strip()))
    i = 0
    while i < len(comment):
        no, text = comment[i]
        spans = [c for c in (_inline_command(s) for s in re.findall(r"`([^`]+)`", text)) if c]
        m = COMMAND.search(text)
        if spans:
            docs += [Doc(c, f"{rel}:{no}") for c in spans]
        elif m:
            lines = [(no, text[m.start() :])]
            while lines[-1][1].endswith("\\") and i + 1 < len(comment):
                i += 1
                lines.append(comment[i])
            for _, cmd in join_shell(lines):
                docs.append(Doc(_balance(cmd), f"{rel}:{no}"))
        elif text.startswith("... ") and docs:  # the command above, up to the word shown
            prev, rest = docs[-1].text.split(), text[4:].split()
            head = prev[: prev.index(rest[0])] if rest[0] in prev else prev
            docs.append(Doc(" ".join(head + rest), f"{rel}:{no}"))
        i += 1
    return docs


def _balance(cmd: str) -> str:
    """`(decode all: python -m x --decode)`: the prose's closing parenthesis is not the command's."""
    while cmd.endswith(")") and cmd.count(")") > cmd.count("("):
        cmd = cmd[:-1].rstrip()
    return cmd


def documented_commands() -> list[Doc]:
    docs = markdown_commands(REPO / "README.md")
    for path in sorted((REPO / "docs").glob("*.md")):
        docs += markdown_commands(path)
    for path in sorted(CONF.rglob("*.yaml")):
        docs += yaml_commands(path)
    unique: dict[str, Doc] = {}
    for d in docs:  # one test per distinct command; the first place it is shown names it
        unique.setdefault(d.text, d)
    return list(unique.values())


# ----------------------------------------------------------------------------------------
# 2. the table: command pattern -> how it is run
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class How:
    kind: str  # run | sweep | resume | compose | cli | expand | delegated | skip
    why: str
    tool: str = ""  # cli: the module; delegated: the test that runs the command


RUN = r"^python3? -m vpt_dml\.run\b"
DDP = r"(?=.* trainer=ddp\b)"
NO_DDP = r"(?!.* trainer=ddp(\b|_cpu\b))"
MULTI = r"(?=.* (-m|--multirun)\b)"
NO_LAUNCHER = r"(?!.* hydra/launcher=)"  # submitit launchers: entries of their own
NO_MULTI = r"(?!.* (-m|--multirun)\b)"
OPTUNA = r"(?=.* \+hparams_search=optuna\b)"  # trials chosen by the sampler: no grid to narrow
NO_OPTUNA = r"(?!.* \+hparams_search=optuna\b)"

# fmt: off
HOW_RUN: dict[str, How] = {
    # -- training runs: a subprocess of the real CLI, tiny settings, tmp output folders --
    RUN + NO_DDP + NO_MULTI + r"(?!.* ckpt_path=)":
        How("run", "tiny ViT (12 blocks for a preset) + tiny data: `data=synthetic` for the demo, a "
                   "fake copy of the official layout (data.strict_counts=false) for a preset; "
                   "/datasets, /path/to and /ckpt paths replaced by those copies and a tiny "
                   "safetensors ViT"),
    RUN + NO_DDP + NO_MULTI + r"(?=.* ckpt_path=)":
        How("resume", "ckpt_path= the last.ckpt of a finished tiny run of the same preset; one "
                      "more epoch"),
    RUN + NO_DDP + MULTI + NO_LAUNCHER + NO_OPTUNA:
        How("sweep", "the sweep's own grid narrowed to its first value per swept key (one job), "
                     "tiny settings, tmp hydra.sweep.dir"),
    RUN + NO_DDP + MULTI + NO_LAUNCHER + OPTUNA:
        How("delegated", "an Optuna search: that test runs a tiny 3 + 2 trial search on the demo "
                         "data through the CLI (one study, best_trial.yaml)",
            "tests/test_optuna_search.py::test_tiny_search_continues_its_study"),
    RUN + r"(?=.* trainer=ddp_cpu\b)(?!.* (-m|--multirun)\b)(?! trainer=ddp_cpu$)":
        How("ddp_cpu", "its own subprocess (2 gloo processes re-launch the CLI), tiny settings"),
    r'^eval "\$\(python3? -m vpt_dml\.run -sc install=bash\)"$':
        How("delegated", "installs bash completion: that test evals the script in bash and "
                         "completes python -m vpt_dml.run lines",
            "tests/test_day_one_options.py::test_shell_completion_install_script_completes_python_m"),
    r"^python -m vpt_dml\.run trainer=ddp_cpu$":
        How("delegated", "conf/trainer/ddp_cpu.yaml's command: that test reads the header and runs it "
                         "on the demo's classes (2 gloo processes, ~30 s)",
            "tests/test_cli.py::test_ddp_cpu_command_runs_on_the_demo_data"),
    # -- GPU only: composed with the same overrides, so a renamed key or group still fails --
    RUN + DDP + NO_LAUNCHER:
        How("compose", "trainer=ddp is NCCL on GPUs; composed + check_config"),
    # -- submitit sweeps (README "On a cluster") --
    RUN + MULTI + r"(?=.* hydra/launcher=slurm\b)":
        How("delegated", "needs a SLURM cluster: that test composes hydra/launcher=slurm with "
                         "every preset and checks the sbatch file it generates",
            "tests/test_cluster.py::test_sbatch_file_asks_for_the_trainers_devices_tasks_and_nodes"),
    RUN + MULTI + r"(?=.* hydra/launcher=local\b)":
        How("delegated", "that test runs a tiny 3-job local submitit sweep (3 processes)",
            "tests/test_sweep.py::test_submitit_local_sweep_runs_each_job_in_its_own_process_and_folder"),
    r"^torchrun (?=.* trainer=ddp_cpu\b).* -m vpt_dml\.run\b":
        How("delegated", "that test runs it on tiny settings and compares with trainer=ddp_cpu",
            "tests/test_torchrun.py::test_torchrun_two_processes_equal_lightnings_ddp_cpu_launch"),
    r"^torchrun (?!.* trainer=ddp_cpu\b).* -m vpt_dml\.run\b":
        How("compose", "multi-node torchrun launch of trainer=ddp (GPUs, several machines); composed"),
    r"^srun python3? -m vpt_dml\.run\b":
        How("compose", "SLURM launch of trainer=ddp (GPUs, a cluster); composed"),
    r"^for \w+ in [^;]+; do .*vpt_dml\.run\b.*; done$":
        How("expand", "each iteration goes through this table (the first of a run-kind loop runs, "
                      "the rest are composed)"),
    # -- the researcher's CLIs, in-process on the tiny run's artefacts --
    r"^python3? -m vpt_dml\.export\b": How("cli", "on the finished tiny run", "export"),
    r"^python3? -m vpt_dml\.embed\b": How("cli", "the tiny export on a folder of JPEGs", "embed"),
    r"^python3? -m vpt_dml\.retrieve\b": How("cli", "the tiny export, a JPEG, the embedded folder",
                                             "retrieve"),
    r"^python3? -m vpt_dml\.index build\b": How("cli", "on the tiny export's embedded folder", "index"),
    r"^python3? -m vpt_dml\.evaluate\b": How("cli", "the tiny export on the JPEGs split into two "
                                                 "labelled folders", "evaluate"),
    r"^python3? -m vpt_dml\.report\b": How("cli", "on the folder of a tiny sweep run here", "report"),
    r"^python3? -m vpt_dml\.data\.verify\b": How("cli", "on a fake copy of the layout", "data.verify"),
    r"^python3? -m vpt_dml\.data\.prepare\b":
        How("delegated", "prepare's CLI on tiny archives in the official formats (hashes through "
                         "$VPT_DML_CHECKSUMS), for every dataset; --download against 127.0.0.1",
            "tests/test_prepare.py::test_prepare_gives_the_layout_the_loader_reads_and_verifies"),
    r"^python3? -m vpt_dml\.compare\b":
        How("delegated", "two run folders with per-query files; that test runs the CLI on them",
            "tests/test_compare.py::test_compare_prints_the_difference_with_interval_and_p"),
    # -- make --
    r"^make demo$": How("expand", "the Makefile recipe's vpt_dml.run line, through this table"),
    r"^make (test|test-full|test-fast)$": How("skip", "runs this test suite itself"),
    r"^make install\b": How("skip", "creates .venv and pip-installs (network, minutes); the suite "
                                    "runs in that venv"),
    r"^make (bench|gpu-check-wheels|lint|clean)$":
        How("skip", "benchmarks take minutes / wheels need the network / lint and clean are not the "
                    "package's behaviour"),
    # -- experiments/ --
    r"^python3? experiments/gpu_check\.py --cpu --tiny(?! --smoke-only)\b":
        How("delegated", "the tiny CPU mode of the GPU check",
            "tests/test_gpu_check.py::test_cpu_tiny_run_trains_both_presets_and_projects"),
    r"^python3? experiments/gpu_check\.py --cpu --tiny --smoke-only\b":
        How("delegated", "the GPU check's smoke phase alone, on CPU",
            "tests/test_gpu_check.py::test_smoke_phase_runs_every_path_once_then_stops"),
    r"^python3? experiments/gpu_check\.py(?! --cpu --tiny\b)":
        How("skip", "needs a GPU and minutes; its --cpu --tiny mode is run by "
                    "tests/test_gpu_check.py"),
    r"^python3? experiments/bench_\w+\.py\b":
        How("skip", "a timing benchmark (minutes at its documented sizes, no tiny flag); "
                    "gpu_check --cpu --tiny runs bench_eval.py at 2,000 items"),
}
# fmt: on


def entries_for(cmd: str) -> list[str]:
    return [pattern for pattern in HOW_RUN if re.search(pattern, cmd)]


def how(cmd: str) -> How:
    found = entries_for(cmd)
    if len(found) != 1:
        raise AssertionError(
            f"documented command {cmd!r} matches {len(found)} entries of HOW_RUN in "
            f"{Path(__file__).relative_to(REPO)} {found}: add (or narrow) one entry saying how "
            f"a test runs it (tiny run, composed, or skipped with the reason)"
        )
    return HOW_RUN[found[0]]


# ----------------------------------------------------------------------------------------
# 3. transformations: a documented command -> a cheap real run
# ----------------------------------------------------------------------------------------
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def expand(cmd: str) -> list[str]:
    """Loops -> iterations, `make T` -> its recipe, `<preset>` -> every preset."""
    kind = how(cmd).kind
    if kind == "expand" and cmd.startswith("for "):
        m = re.match(r"^for (\w+) in ([^;]+); do (.*); done$", cmd)
        var, values, body = m.group(1), m.group(2).split(), m.group(3)
        return [
            re.sub(rf"\$\{{?{var}\}}?", v, part.strip()) for v in values for part in body.split(";")
        ]
    if kind == "expand" and cmd.startswith("make "):
        return make_recipe(cmd.split()[1])
    if "<preset>" in cmd:
        return [cmd.replace("<preset>", p) for p in PRESETS if p != "demo"]
    return [cmd]


def make_recipe(target: str) -> list[str]:
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{re.escape(target)}:", line))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(re.sub(r"^\$\(PY\)", "python", line.strip()))
    return recipe


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


# ----------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------
DOCS = documented_commands()


def test_every_documented_command_has_exactly_one_table_entry() -> None:
    assert len(DOCS) >= 10, [d.text for d in DOCS]  # the extractor still reads the sources
    problems = []
    for doc in DOCS:
        for cmd in [doc.text, *expand(doc.text)] if entries_for(doc.text) else [doc.text]:
            try:
                how(cmd)
            except AssertionError as e:
                problems.append(f"{doc.where}: {e}")
    assert not problems, "\n".join(problems)


def test_extractor_joins_continuations_loops_and_strips_comments(tmp_path: Path) -> None:
    md = tmp_path / "x.md"
    md.write_text(
        "Run `python -m vpt_dml.run seed=1`, or\n`python -m vpt_dml.run\nseed=2`.\n```bash\n"
        "python -m vpt_dml.run a=1 \\\n  b=2   # why\nls -l\n"
        "for n in 1 2; do\n  python -m vpt_dml.run n=$n \\\n    c=3\ndone\n```\n"
        "```\nmake demo\n```\n"
    )
    yml = tmp_path / "y.yaml"
    yml.write_text(
        "# Run: python -m vpt_dml.run +experiment=x p=/a\n"
        "#   torchrun --nnodes=2 \\\n#     -m vpt_dml.run t=1\n"
        "#   ... +more=2\nkey: 1  # python -m vpt_dml.run not-a-comment-command\n"
        "# see (python -m vpt_dml.data.verify NAME ROOT --decode)\n"
    )
    orig = REPO
    try:
        globals()["REPO"] = tmp_path
        got_md = [d.text for d in markdown_commands(md)]
        got_yml = [d.text for d in yaml_commands(yml)]
    finally:
        globals()["REPO"] = orig
    assert got_md == [
        "python -m vpt_dml.run seed=1",
        "python -m vpt_dml.run a=1 b=2",
        "for n in 1 2; do python -m vpt_dml.run n=$n c=3; done",
        "python -m vpt_dml.run seed=2",  # an inline span wrapped over two lines
    ]
    assert got_yml == [
        "python -m vpt_dml.run +experiment=x p=/a",
        "torchrun --nnodes=2 -m vpt_dml.run t=1",
        "torchrun --nnodes=2 -m vpt_dml.run t=1 +more=2",  # `...`: the command above
        "python -m vpt_dml.data.verify NAME ROOT --decode",
    ]
    assert expand(got_md[2]) == [
        "python -m vpt_dml.run n=1 c=3",
        "python -m vpt_dml.run n=2 c=3",
    ]


def test_a_new_command_without_an_entry_is_named_in_the_failure() -> None:
    with pytest.raises(AssertionError, match=r"python -m vpt_dml\.newtool x.*HOW_RUN"):
        how("python -m vpt_dml.newtool x")
    with pytest.raises(AssertionError, match="matches 0 entries"):
        how("python experiments/new_script.py")


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
