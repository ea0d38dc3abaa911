"""Shared fixtures: tiny configs composed from the real conf/ tree, no network."""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A ViT small enough for 2 CPU cores; the same timm class as the paper's backbones.
TINY_BACKBONE = [
    "model.backbone.name=vit_tiny_patch16_224",
    "model.backbone.pretrained=false",
    "model.backbone.weights=null",
    "++model.backbone.synthetic_pretraining=null",
    "++model.backbone.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
    "model.embed_dim=16",
]
TINY_DATA = [
    "data=synthetic",
    "data.synthetic.num_classes=8",
    "data.synthetic.images_per_class=6",
    "data.synthetic.image_size=32",
    "data.batch_size=8",
    "data.samples_per_class=2",
    "data.num_workers=0",
    "data.eval_batch_size=64",
]
TINY_TRAINER = [
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.precision=32-true",
    "trainer.devices=1",
    "trainer.strategy=auto",
    "logger=csv",
]


# Composed configs by (overrides, experiment, cwd): Hydra takes ~0.3 s a composition and
# many tests compose the same tiny settings; each caller gets its own deep copy.
_COMPOSED: dict[tuple, DictConfig] = {}


def compose_config(
    overrides: list[str], tmp_path: Path, experiment: str | None = None
) -> DictConfig:
    """Compose conf/train.yaml as `python -m vpt_dml.run` would, with paths in tmp_path."""
    key = (tuple(overrides), experiment, os.getcwd())
    if key not in _COMPOSED:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            extra = [f"+experiment={experiment}"] if experiment else []
            composed = compose("train", overrides=extra + overrides, return_hydra_config=True)
        _COMPOSED[key] = composed
    cfg = copy.deepcopy(_COMPOSED[key])
    with open_dict(cfg):
        cfg.paths.root_dir = str(REPO)
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    return cfg


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def tiny_overrides(*extra: str) -> list[str]:
    """The tiny settings, with any key that `extra` sets again left to `extra`."""
    replaced = {_key(o) for o in extra}
    base = [o for o in TINY_BACKBONE + TINY_DATA + TINY_TRAINER if _key(o) not in replaced]
    return base + list(extra)


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> DictConfig:
    return compose_config(tiny_overrides(), tmp_path)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """The run folder of one finished tiny run (1 epoch, no evaluation before training):
    checkpoints/last.ckpt, metrics.json, csv/, config_resolved.yaml. Shared by the whole
    session: read it, never write into it (copy it first: shutil.copytree)."""
    from vpt_dml.run import train

    root = tmp_path_factory.mktemp("finished")
    cfg = compose_config(tiny_overrides("eval_before_training=false"), root)
    train(cfg)
    return Path(cfg.paths.output_dir)


@pytest.fixture(scope="session")
def resume_pair(tmp_path_factory) -> dict:
    """One straight/resumed pair of the tiny settings (trainer.log_every_n_steps=1) on one
    generated dataset: `straight` trains 2 epochs; `resumed` trains 1 epoch, is copied to
    `first` (that epoch's folder, kept to read), then resumes in its own folder from its
    last.ckpt to 2 epochs. Values: the three folders and "metrics" (what train returned
    for straight and resumed). Shared by the session: read, never write (copy first)."""
    import shutil

    from vpt_dml.run import train

    root = tmp_path_factory.mktemp("resume_pair")

    def run(name: str, *extra: str) -> dict:
        cfg = compose_config(tiny_overrides("trainer.log_every_n_steps=1", *extra), root)
        with open_dict(cfg):
            cfg.paths.data_dir = str(root / "data")
            cfg.paths.output_dir = str(root / name)
            cfg.hydra.runtime.output_dir = cfg.paths.output_dir
        return train(cfg)

    straight = run("straight", "trainer.max_epochs=2")
    run("resumed", "trainer.max_epochs=1")
    shutil.copytree(root / "resumed", root / "first")
    last = root / "resumed" / "checkpoints" / "last.ckpt"
    resumed = run("resumed", "trainer.max_epochs=2", f"ckpt_path={last}")
    return {
        "straight": root / "straight",
        "first": root / "first",
        "resumed": root / "resumed",
        "metrics": {"straight": straight, "resumed": resumed},
    }


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory) -> dict:
    """A finished tiny run of test_export's backbone (random init) and its export:
    {"root", "run_dir", "weights" (the export file), "data" (its generated images)}.
    Shared by the session (embed, retrieve, index tests): read, never write."""
    from tests.runs.test_export import train_run
    from vpt_dml.serving.exported import export_run

    root = tmp_path_factory.mktemp("exported_run")
    run_dir = train_run(root)
    weights = root / "model.safetensors"
    export_run(run_dir, weights)
    return {"root": root, "run_dir": run_dir, "weights": weights, "data": root / "data"}


@pytest.fixture(scope="session")
def local_sweep(tmp_path_factory) -> dict:
    """One sweep through hydra/launcher=local (submitit's local executor, Hydra's
    submitit_local underneath: one process per job), optim.lr=0.001,abc: job 0
    finishes, job 1 is refused by the config check (an `error:` line, exit 2, in its
    submitit log). {"dir": the sweep folder, "proc": the sweep's CompletedProcess}.
    Shared by the session: read, never write (vpt_dml.report: give --out)."""
    root = tmp_path_factory.mktemp("local_sweep")
    sweep = root / "sweep"
    args = [
        "-m",
        "hydra/launcher=local",
        *tiny_overrides("eval_before_training=false"),
        "optim.lr=0.001,abc",
        f"paths.data_dir={root / 'data'}",
        f"hydra.sweep.dir={sweep}",
    ]
    from processes import LOCAL_JOBS_FORKED

    return {"dir": sweep, "proc": run_cli(args, cwd=root, env=LOCAL_JOBS_FORKED)}


def run_cli(
    args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600, fork: bool = True
):
    """Run `python -m vpt_dml.run ...` in a child process (for CLI / DDP / sweep tests): its
    own process group, killed whole on a timeout, forked from the fork server unless
    `fork=False` (a fresh interpreter: tests/processes.py)."""
    import processes

    return processes.run(
        processes.python("-m", "vpt_dml.run", *args),
        cwd=cwd,
        env=processes.child_env(env),
        timeout=timeout,
        fork=fork,
    )


def cli_in_process(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600):
    """`python -m vpt_dml.run ...` in this process: the same entry (run.cli: the command-line
    checks, then Hydra on `args`) without a child's imports of torch/Lightning/Hydra, and
    with no process-wide watchdog armed. Returns a CompletedProcess (exit code, stdout,
    stderr) like run_cli; the process's cwd, environment, argv, logging and signal handlers
    are as they were afterwards. For tests of exit codes and error lines; `timeout` is
    pytest-timeout's job here."""
    import contextlib
    import io
    import logging
    import signal
    import subprocess
    import threading

    from vpt_dml import run

    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), list(sys.argv)
    manager = logging.Logger.manager
    saved_loggers = {
        name: (lg.level, list(lg.handlers), lg.propagate, lg.disabled)
        for name, lg in [("", logging.getLogger()), *manager.loggerDict.items()]
        if isinstance(lg, logging.Logger)
    }
    signums = [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2]
    saved_handlers = {s: signal.getsignal(s) for s in signums}
    timers = {t for t in threading.enumerate() if isinstance(t, threading.Timer)}
    # "a SIGTERM came" is process-wide (the CLI's process is one run): an earlier test's
    # signal must not make this call stop as interrupted and arm exit_within's os._exit
    from vpt_dml.runs import sigterm as guard

    saved_received, guard._RECEIVED = guard._RECEIVED, False
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        # HYDRA_MAIN_MODULE: Hydra finds conf/ from run.py's file, as under `python -m`
        # (imported, it would look for a `conf` package)
        quiet = {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HYDRA_MAIN_MODULE": "__main__"}
        os.environ.update({**quiet, **(env or {})})
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                run.cli(list(args), watchdog=False)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        guard._RECEIVED = saved_received
        os.chdir(saved_cwd)
        sys.argv[:] = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        for name, (level, handlers, propagate, disabled) in saved_loggers.items():
            lg = logging.getLogger(name or None)
            lg.setLevel(level)
            lg.handlers[:] = handlers
            lg.propagate, lg.disabled = propagate, disabled
        for s, handler in saved_handlers.items():
            if handler is not None:  # None: a handler not set from Python, left alone
                signal.signal(s, handler)
    # an armed watchdog (a timer that ends the process) must never outlive the call
    left = {t for t in threading.enumerate() if isinstance(t, threading.Timer)} - timers
    for timer in left:
        timer.cancel()  # the session goes on; the test fails below
    assert not left, f"run.cli left a timer running in the test process: {left}"
    return subprocess.CompletedProcess(["vpt_dml.run", *args], code, out.getvalue(), err.getvalue())


def resolved(cfg: DictConfig) -> dict:
    """The run's config as plain data (the `hydra` node left out: it needs a live job)."""
    from vpt_dml.runs.provenance import cfg_without_hydra

    return OmegaConf.to_container(cfg_without_hydra(cfg), resolve=True)


def bare_trainer(tmp_path: Path, **settings):
    """A Lightning Trainer on CPU with nothing around the loop (no logger, checkpoints,
    model summary or sanity check); `settings` add or override Trainer arguments."""
    import lightning as L

    base = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**base, **settings})


def load_experiment(name: str):
    """experiments/<name>.py imported as module `name` (scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


# == tiers, timeouts, threads, durations ==================================================
# Four tiers, one folder each under tests/; a test's marker (select with -m) is its folder:
# tests/unit/ (`unit`: functions, no training), tests/runs/ (`runs`: tiny runs trained in
# this process, and the command line run in process: cli_in_process), tests/processes/
# (`processes`: real child processes: the CLI wiring, DDP, torchrun, signals, sweeps) and
# tests/documented/ (`documented`: the end-to-end runs of every documented command and of
# experiments/gpu_check.py --cpu --tiny). tests/slurm/ (jobs through a real Slurm) is of
# the `processes` tier and its tests are marked `slurm` too. `make test` runs all but
# `documented` and `slurm`; `make test-full` runs everything.
# Under pytest-xdist the tests that keep both cores busy share one xdist_group, so two of
# them never overlap on a 2-core machine: those marked `both_cores` (DDP ranks, torchrun,
# parallel sweep jobs). The Slurm tests are a group of their own (one job at a time on the
# one-node cluster). A test with one child (a CLI run, an error line, a documented
# command) runs beside any other test, as a worker would. Children are forked from a fork
# server with torch, Lightning, Hydra and timm imported (tests/forkserver.py).
# A test outside tests/processes, tests/documented and tests/slurm that starts a Python
# child fails (see _children_only_in_tiers): the folders cannot silently go stale.

TIERS = ("unit", "runs", "processes", "documented")
# the folders under tests/ and their tiers
FOLDERS = {tier: tier for tier in TIERS} | {"slurm": "processes"}
# Per-test timeout (pytest-timeout, seconds) by tier; a test's own timeout marker wins.
# Hangs end as failures with a traceback; the numbers are for a loaded 2-core machine.
TIMEOUT_S = {"unit": 300, "runs": 300, "processes": 600, "documented": 1200}
# Backstop after the per-test timeout: a hang in C code that never returns to Python (the
# SIGALRM of timeout_method="signal" cannot interrupt it) dumps every thread's traceback
# and ends this pytest process (an xdist worker is replaced; the run goes on).
HARD_STOP_S = float(os.environ.get("VPT_TEST_HARD_STOP_S", "120"))

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if _WORKERS > 1:  # one torch thread per worker on 2 cores: two workers, not four threads fighting
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = str(max(1, (os.cpu_count() or 1) // _WORKERS))


def tier_of(nodeid: str) -> str | None:
    """The tier of a test: its folder under tests/ (FOLDERS). A test of another rootdir
    (the suite guards' own pytest runs in a tmp folder) is `unit`; a test under tests/ but
    outside those folders has none (None: refused at collection)."""
    parts = nodeid.split("::", 1)[0].split("/")
    if parts[0] != "tests":
        return "unit"
    return FOLDERS.get(parts[1]) if len(parts) > 2 else None


def pytest_configure(config: pytest.Config) -> None:
    for tier in TIERS:
        config.addinivalue_line("markers", f"{tier}: test tier (the folder tests/{tier}/)")
    if _WORKERS > 1:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    config._durations_started = (time.time(), os.getloadavg())
    # where the backstop writes: the real stderr (capture is suspended here; in a test, fd 2
    # is pytest's capture file, lost when the process ends)
    config._hang_stderr_fd = os.dup(2)


def xdist_group_of(item: pytest.Item, tier: str) -> str | None:
    """Tests whose processes keep both cores busy (marked both_cores): one group, never
    two at once. Slurm tests: a group of their own, one job at a time on the one-node
    cluster; they mostly wait on Slurm (its scheduler, a time limit), so they run beside
    the other groups. Tests that share one of the suite's module- or session-scoped
    fixtures (a trained run, an export, the documented commands' session): one group per
    fixture, so one worker builds it, not each."""
    if item.nodeid.startswith("tests/slurm/"):
        return "slurm"
    if item.get_closest_marker("both_cores"):
        return "processes"
    shared = [
        defs[-1]
        for defs in item._fixtureinfo.name2fixturedefs.values()
        if defs and defs[-1].scope in ("module", "session") and defs[-1].baseid.startswith("tests")
    ]
    for fixturedef in sorted(shared, key=lambda d: d.scope != "session"):
        if fixturedef.scope == "session":
            return f"fixture-{fixturedef.argname}"
        return item.nodeid.split("::", 1)[0]
    return None


def pytest_itemcollected(item: pytest.Item) -> None:
    """Marks as each test is collected: before -m deselects and before xdist's loadgroup
    (its pytest_collection_modifyitems) reads the groups."""
    tier = tier_of(item.nodeid)
    if tier is None:
        raise pytest.UsageError(
            f"{item.nodeid}: a test under tests/ lives in the folder of its tier: "
            + ", ".join(f"tests/{folder}/" for folder in FOLDERS)
        )
    item.add_marker(tier)
    if group := xdist_group_of(item, tier):
        item.add_marker(pytest.mark.xdist_group(group))
    if item.get_closest_marker("timeout") is None:
        item.add_marker(pytest.mark.timeout(TIMEOUT_S[tier]))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """--dist loadgroup in an xdist worker: name each grouped test `<nodeid>@<group>`, the
    name the controller schedules by. pytest-xdist 3.8 renames `item._nodeid`, which pytest
    9 no longer reads (it keeps `item._id`): its groups were spread over the workers, two
    DDP tests ran at once. Done here the way pytest 9 reads it; a no-op where xdist's works."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        marks = item.iter_markers("xdist_group")
        names = sorted(
            {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in marks}
        )
        suffix = "@" + "_".join(names)
        if not names or item.nodeid.endswith(suffix):
            continue
        if hasattr(item, "_id"):
            from _pytest.nodeid import coerce_node_id

            item._id = coerce_node_id(item.nodeid + suffix)
        else:
            item._nodeid = item.nodeid + suffix


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    import faulthandler

    marker = item.get_closest_marker("timeout")
    limit = float(marker.args[0] if marker and marker.args else TIMEOUT_S["unit"])
    fd = getattr(item.config, "_hang_stderr_fd", 2)
    faulthandler.dump_traceback_later(limit + HARD_STOP_S, exit=True, file=fd)
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()


# -- Python children only in the process tiers ----------------------------------------------
_children: list[list[str]] = []


def _audit(event: str, args: tuple) -> None:
    if event == "subprocess.Popen":
        argv = [str(a) for a in (args[1] if isinstance(args[1], (list, tuple)) else [args[1]])]
        name = Path(argv[0]).name if argv else ""
        if argv and (argv[0] == sys.executable or name.startswith(("python", "torchrun"))):
            _children.append(argv)
    elif event == "vpt_dml.tests.forked":  # a child of the fork server (tests/processes.py)
        _children.append([str(a) for a in args[0]])


sys.addaudithook(_audit)


@pytest.fixture(autouse=True)
def _children_only_in_tiers(request: pytest.FixtureRequest):
    del _children[:]
    yield
    tier = tier_of(request.node.nodeid)
    if _children and tier not in ("processes", "documented"):  # slurm/: processes
        first = " ".join(_children[0])[:200]
        pytest.fail(
            f"{request.node.nodeid} ({tier}) started {len(_children)} Python process(es), e.g. "
            f"`{first}`: move it to tests/processes/ (mark it both_cores if it keeps both cores "
            "busy: kept from overlapping other such tests under xdist), or check it in process "
            "(cli_in_process)",
            pytrace=False,
        )


# -- durations: every run of the suite leaves its timings (make test / make test-full) -------
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--durations-file",
        default=None,
        help="write each test's seconds (setup+call+teardown), its tier, the machine and its "
        "load to this file",
    )


_timings: dict[str, dict] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    nodeid = report.nodeid.split("@", 1)[0]  # xdist's loadgroup suffix
    entry = _timings.setdefault(nodeid, {"s": 0.0, "outcome": "passed"})
    entry["s"] += report.duration
    if report.outcome != "passed" and entry["outcome"] == "passed":
        entry["outcome"] = (
            report.outcome if report.when == "call" else f"{report.outcome}@{report.when}"
        )


def _machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    path = config.getoption("--durations-file")
    if not path or hasattr(config, "workerinput"):  # the controller writes it, not a worker
        return
    start, load_start = getattr(config, "_durations_started", (time.time(), os.getloadavg()))
    wall = time.time() - start
    rows = sorted(_timings.items(), key=lambda kv: -kv[1]["s"])
    by_tier: dict[str, list[float]] = {}
    for nodeid, entry in rows:
        by_tier.setdefault(tier_of(nodeid), []).append(entry["s"])
    outcomes: dict[str, int] = {}
    for _, entry in rows:
        outcomes[entry["outcome"]] = outcomes.get(entry["outcome"], 0) + 1
    workers = getattr(config.option, "numprocesses", None) or 1
    lines = [
        f"# pytest {' '.join(config.invocation_params.args)}",
        f"# finished {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; exit status {int(exitstatus)}",
        f"# machine: {_machine()}; xdist workers: {workers}",
        f"# load average (1, 5, 15 min) at start {tuple(round(x, 2) for x in load_start)}, "
        f"at end {tuple(round(x, 2) for x in os.getloadavg())}",
        f"# wall {wall:.1f} s; tests {len(rows)}: "
        + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())),
        "# per tier (tests, summed seconds): "
        + ", ".join(f"{t} {len(by_tier[t])} {sum(by_tier[t]):.1f}" for t in TIERS if t in by_tier),
        "# seconds  tier        outcome  test (setup + call + teardown)",
    ]
    lines += [
        f"{entry['s']:9.2f}  {tier_of(nodeid):10}  {entry['outcome']:7}  {nodeid}"
        for nodeid, entry in rows
    ]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
