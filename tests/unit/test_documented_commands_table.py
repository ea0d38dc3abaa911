"""Every command README.md, docs/*.md and the conf/ headers show is run (tiny settings),
composed (GPU-only), or skipped with a stated reason, by ONE table: HOW_RUN.

A documented command that matches no entry (or two) fails
`test_every_documented_command_has_exactly_one_table_entry`, naming the command and HOW_RUN.

This file holds the extractor and the table, and checks the table; the end-to-end runs it
describes are tests/documented/test_documented_commands.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import CONF, REPO

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
            "tests/processes/test_optuna_search_cli.py::test_tiny_search_continues_its_study"),
    RUN + r"(?=.* trainer=ddp_cpu\b)(?!.* (-m|--multirun)\b)(?! trainer=ddp_cpu$)":
        How("ddp_cpu", "its own subprocess (2 gloo processes re-launch the CLI), tiny settings"),
    r'^eval "\$\(python3? -m vpt_dml\.run -sc install=bash\)"$':
        How("delegated", "installs bash completion: that test evals the script in bash and "
                         "completes python -m vpt_dml.run lines",
            "tests/processes/test_shell_completion.py::test_shell_completion_install_script_completes_python_m"),
    r"^python -m vpt_dml\.run trainer=ddp_cpu$":
        How("delegated", "conf/trainer/ddp_cpu.yaml's command: that test reads the header and runs it "
                         "on the demo's classes (2 gloo processes, ~30 s)",
            "tests/documented/test_ddp_cpu_demo_command.py::test_ddp_cpu_command_runs_on_the_demo_data"),
    # -- GPU only: composed with the same overrides, so a renamed key or group still fails --
    RUN + DDP + NO_LAUNCHER:
        How("compose", "trainer=ddp is NCCL on GPUs; composed + check_config"),
    # -- submitit sweeps (README "On a cluster") --
    RUN + MULTI + r"(?=.* hydra/launcher=slurm\b)":
        How("delegated", "needs a SLURM cluster: that test composes hydra/launcher=slurm with "
                         "every preset and checks the sbatch file it generates",
            "tests/unit/test_cluster.py::test_sbatch_file_asks_for_the_trainers_devices_tasks_and_nodes"),
    RUN + MULTI + r"(?=.* hydra/launcher=local\b)":
        How("delegated", "that test runs a tiny 2-job local submitit sweep (2 processes)",
            "tests/processes/test_sweep.py::test_submitit_local_sweep_runs_each_job_in_its_own_process_and_folder"),
    r"^torchrun (?=.* trainer=ddp_cpu\b).* -m vpt_dml\.run\b":
        How("delegated", "that test runs it on tiny settings and compares with trainer=ddp_cpu",
            "tests/processes/test_ddp.py::test_torchrun_two_processes_equal_lightnings_ddp_cpu_launch"),
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
            "tests/unit/test_prepare.py::test_prepare_gives_the_layout_the_loader_reads_and_verifies"),
    r"^python3? -m vpt_dml\.compare\b":
        How("delegated", "two run folders with per-query files; that test runs the CLI on them",
            "tests/runs/test_compare.py::test_compare_prints_the_difference_with_interval_and_p"),
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
            "tests/documented/test_gpu_check_cpu_tiny.py::test_cpu_tiny_run_trains_both_presets_and_projects"),
    r"^python3? experiments/gpu_check\.py --cpu --tiny --smoke-only\b":
        How("delegated", "the GPU check's smoke phase alone, on CPU",
            "tests/documented/test_gpu_check_cpu_tiny.py::test_smoke_phase_runs_every_path_once_then_stops"),
    r"^python3? experiments/gpu_check\.py(?! --cpu --tiny\b)":
        How("skip", "needs a GPU and minutes; its --cpu --tiny mode is run by "
                    "tests/documented/test_gpu_check_cpu_tiny.py"),
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
