"""Shared fixtures: tiny configs composed from the real conf/ tree, no network."""

from __future__ import annotations

import contextlib
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


def compose_config(
    overrides: list[str], tmp_path: Path, experiment: str | None = None
) -> DictConfig:
    """Compose conf/train.yaml as `python -m vpt_dml.run` would, with paths in tmp_path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        extra = [f"+experiment={experiment}"] if experiment else []
        cfg = compose("train", overrides=extra + overrides, return_hydra_config=True)
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
    from tests.test_export import train_run
    from vpt_dml.serving.exported import export_run

    root = tmp_path_factory.mktemp("exported_run")
    run_dir = train_run(root)
    weights = root / "model.safetensors"
    export_run(run_dir, weights)
    return {"root": root, "run_dir": run_dir, "weights": weights, "data": root / "data"}


@pytest.fixture(scope="session")
def local_sweep(tmp_path_factory) -> dict:
    """One sweep through hydra/launcher=local (submitit's local executor, Hydra's
    submitit_local underneath: one process per job), optim.lr=0.001,0.002,abc: jobs 0 and
    1 finish, job 2 is refused by the config check (an `error:` line, exit 2, in its
    submitit log). {"dir": the sweep folder, "proc": the sweep's CompletedProcess}.
    Shared by the session: read, never write (vpt_dml.report: give --out)."""
    root = tmp_path_factory.mktemp("local_sweep")
    sweep = root / "sweep"
    args = [
        "-m",
        "hydra/launcher=local",
        *tiny_overrides("eval_before_training=false"),
        "optim.lr=0.001,0.002,abc",
        f"paths.data_dir={root / 'data'}",
        f"hydra.sweep.dir={sweep}",
    ]
    return {"dir": sweep, "proc": run_cli(args, cwd=root)}


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
    guard = sys.modules[run.sigterm_received.__module__]
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
# Four tiers, as markers (select with -m): `unit` (functions, no training), `runs`
# (tiny runs trained in this process), `processes` (real child processes: the CLI
# wiring, DDP, torchrun, signals, sweeps, Slurm) and `documented` (the end-to-end runs of
# every documented command and of experiments/gpu_check.py --cpu --tiny). `make test`
# runs all but `documented` and `slurm`; `make test-full` runs everything.
# Tests of `processes`/`documented` start Python children; under pytest-xdist the ones that
# load both cores (HEAVY: DDP ranks, torchrun, sweeps, SIGTERM to a group) share one
# xdist_group, so two of them never overlap on a 2-core machine.
# A test outside those tiers that starts a Python child fails (see _children_only_in_tiers):
# the list below cannot silently go stale.

DOCUMENTED = (
    "tests/test_documented_commands.py::test_documented_command",
    "tests/test_cli.py::test_ddp_cpu_command_runs_on_the_demo_data",  # its documented command
    "tests/test_gpu_check.py::test_smoke_phase_runs_every_path_once_then_stops",
    "tests/test_gpu_check.py::test_a_failing_smoke_phase_keeps_the_measured_runs_from_starting",
    "tests/test_gpu_check.py::test_cpu_tiny_run_trains_both_presets_and_projects",
)
PROCESSES = (
    "tests/slurm/",
    "tests/processes/",
    "tests/test_backbone_family_runs.py::test_tiny_run_through_the_cli_finishes",
    "tests/test_backbone_local_dir.py::test_local_dir_run_records_the_folders_preprocessing_in_metrics_json",
    "tests/test_optuna_search.py::test_a_search_without_validation_classes_is_refused_before_any_trial",
    "tests/test_optuna_search.py::test_tiny_search_continues_its_study",
    "tests/test_backbone_families.py::test_distilled_deit_trains_through_the_cli",
    "tests/test_checkpoint_io.py::test_disk_full_during_training_is_one_line_and_leaves_whole_checkpoints",
    "tests/test_checkpoint_io.py::test_disk_full_before_the_first_checkpoint_advises_no_missing_last_ckpt",
    "tests/test_checkpoint_io.py::test_a_disk_too_full_to_start_is_one_line",
    "tests/test_gpu_check.py::test_layouts_are_written_while_another_thread_is_importing",
    "tests/test_layers.py::test_second_node_prints_no_error_line",
    "tests/test_sampler_reference.py::test_ddp_ranks_train_on_their_turns_of_the_reference_batches",
    "tests/test_sweep.py::test_in_process_sweep_records_failed_jobs_and_runs_the_rest",
    "tests/test_cli.py::test_cli_run_dir_and_metrics",
    "tests/test_cluster.py::test_every_process_of_a_job_names_the_same_run_folder",
    "tests/test_compose_options.py::test_real_multirun_jobs_run_what_they_name",
    "tests/test_data_errors.py::test_cli_corrupt_image_during_training_ends_with_one_line",
    "tests/test_day_one_options.py::test_shell_completion_install_script_completes_python_m",
    "tests/test_ddp.py::test_ddp_cpu_ranks_agree_and_match_single_process_eval",
    "tests/test_per_query.py::test_run_writes_per_query_files_equal_to_metrics_json_inshop",
    "tests/test_per_query.py::test_run_writes_per_query_files_equal_to_metrics_json_self_retrieval",
    "tests/test_report.py::test_seed_sweep_on_demo_data_reports_mean_std_and_interval",
    "tests/test_report.py::test_submitit_sweep_folder_lists_failed_jobs_with_their_error_line",
    "tests/test_requeue.py::test_sigusr1_requeues_and_the_requeued_job_resumes_exactly",
    "tests/test_run_folder.py::test_claim_refuses_a_live_lock_and_takes_over_a_stale_one",
    "tests/test_run_folder.py::test_second_run_into_a_folder_in_use_touches_nothing",
    "tests/test_run_folder.py::test_stale_lock_is_taken_over_and_released",  # dead_pid()
    "tests/test_sigterm.py::test_an_exit_with_a_live_worker_is_not_held_up_by_it",
    "tests/test_sigterm.py::test_ddp_error_is_printed_once",
    "tests/test_sigterm.py::test_group_sigterm_as_the_ddp_final_test_ends_lets_rank_0_finish_the_record",
    "tests/test_sigterm.py::test_sigterm_in_the_final_test_ends_the_sweep_with_the_run_finished",
    "tests/test_sigterm.py::test_sigterm_mid_run_exits_143_with_checkpoint_and_interrupted_metrics",
    "tests/test_sigterm.py::test_sigterm_to_the_process_group_ends_in_143_interrupted",
    "tests/test_sigterm.py::test_watchdog_ends_a_process_stuck_after_sigterm",
    "tests/test_suite_guards.py::",
    "tests/test_sweep.py::test_ddp_inside_a_local_submitit_job_is_one_two_process_run",
    "tests/test_sweep.py::test_rerun_of_an_interrupted_sweep_skips_resumes_and_runs_the_rest",
    "tests/test_sweep.py::test_submitit_local_sweep_runs_each_job_in_its_own_process_and_folder",
    "tests/test_sweep.py::test_two_point_prompt_length_sweep_is_reported",
    "tests/test_text_progress.py::test_run_with_stdout_in_a_file_logs_epochs_and_metrics",
    "tests/test_torchrun.py::",
)
# Of those, the ones that keep both cores busy (DDP ranks, torchrun, sweeps' jobs, a
# process group under SIGTERM, Slurm): one xdist_group, so two never overlap. A test with
# one child (a CLI run, an error line) runs beside any other test, as a worker would.
HEAVY = (
    "tests/slurm/",
    "tests/test_optuna_search.py::test_tiny_search_continues_its_study",
    "tests/test_cluster.py::test_every_process_of_a_job_names_the_same_run_folder",
    "tests/test_compose_options.py::test_real_multirun_jobs_run_what_they_name",
    "tests/test_ddp.py::",
    "tests/test_sampler_reference.py::test_ddp_ranks_train_on_their_turns_of_the_reference_batches",
    "tests/test_sweep.py::test_in_process_sweep_records_failed_jobs_and_runs_the_rest",
    "tests/test_report.py::test_seed_sweep_on_demo_data_reports_mean_std_and_interval",
    "tests/test_report.py::test_submitit_sweep_folder_lists_failed_jobs_with_their_error_line",
    "tests/test_sigterm.py::",
    "tests/test_sweep.py::test_ddp_inside_a_local_submitit_job_is_one_two_process_run",
    "tests/test_sweep.py::test_rerun_of_an_interrupted_sweep_skips_resumes_and_runs_the_rest",
    "tests/test_sweep.py::test_submitit_local_sweep_runs_each_job_in_its_own_process_and_folder",
    "tests/test_sweep.py::test_two_point_prompt_length_sweep_is_reported",
    "tests/test_torchrun.py::",
)
# Files whose tests (some or all) train a tiny run in this process, and single tests that
# run the command line in process (cli_in_process).
RUNS = (
    "tests/test_backbone_weights.py::test_resnet_weights_stop_the_run_with_one_error_line",
    "tests/test_cli.py::test_bad_input_is_one_line_error",
    "tests/test_config_checks.py::test_cli_refuses_before_anything_runs",
    "tests/test_data_errors.py::test_cli_wrong_root_ends_with_one_line",
    "tests/test_day_one_options.py::test_command_line_hydra_would_answer_with_a_traceback_is_one_line",
    "tests/test_divergence.py::test_huge_lr_is_one_diverged_line_and_exit_3",
    "tests/test_run_errors.py::test_bad_ckpt_path_is_one_line",
    "tests/test_run_errors.py::test_checkpoint_of_another_model_names_tensor_shapes_and_preset",
    "tests/test_run_errors.py::test_debug_shows_the_traceback",
    "tests/test_run_errors.py::test_output_folder_under_a_file_is_one_line",
    "tests/test_run_errors.py::test_unwritable_output_folder_is_one_line",
    "tests/test_run_errors.py::test_wrong_type_override_names_key_and_type",
    "tests/test_run_folder.py::test_second_run_into_a_finished_folder_touches_nothing",
    "tests/test_sweep.py::test_sweep_with_multi_device_ddp_is_refused",
    "tests/test_backbone_options.py::test_a_name_without_its_option_is_one_line_refusal",
    "tests/test_backbone_families.py",
    "tests/test_backbone_weights.py",
    "tests/test_checkpoint_io.py",
    "tests/test_class_prompt_store.py",
    "tests/test_day_one_options.py",
    "tests/test_divergence.py",
    "tests/test_embedding_health.py",
    "tests/test_eval_schedule.py",
    "tests/test_exact_resume.py",
    "tests/test_export.py",
    "tests/test_forward_branches.py",
    "tests/test_manifest.py",
    "tests/test_peft.py",
    "tests/test_presets.py",
    "tests/test_results.py",
    "tests/test_resume_config.py",
    "tests/test_run_errors.py",
    "tests/test_run_folder.py",
    "tests/test_run_pipeline.py",
    "tests/test_sampler.py",
    "tests/test_sigterm.py",
    "tests/test_text_progress.py",
    "tests/test_wandb_logger.py",
    "tests/test_compare.py",
    "tests/test_per_query.py",
    "tests/test_report.py",
)
TIERS = ("unit", "runs", "processes", "documented")
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


def tier_of(nodeid: str) -> str:
    base = nodeid.split("[", 1)[0].split("@", 1)[0]
    if any(base == d or base.startswith(d) for d in DOCUMENTED):
        return "documented"
    if any(base == p or base.startswith(p) for p in PROCESSES):
        return "processes"
    if base.split("::", 1)[0] in RUNS or any(base.startswith(r) for r in RUNS if "::" in r):
        return "runs"
    return "unit"


def pytest_configure(config: pytest.Config) -> None:
    for tier in TIERS:
        config.addinivalue_line("markers", f"{tier}: test tier (tests/conftest.py TIERS)")
    if _WORKERS > 1:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    config._durations_started = (time.time(), os.getloadavg())
    # where the backstop writes: the real stderr (capture is suspended here; in a test, fd 2
    # is pytest's capture file, lost when the process ends)
    config._hang_stderr_fd = os.dup(2)


def xdist_group_of(item: pytest.Item, tier: str) -> str | None:
    """Tests whose processes keep both cores busy (HEAVY, documented): one group, never
    two at once. Tests that share one of the suite's module- or session-scoped fixtures (a
    trained run, an export): one group per fixture, so one worker builds it, not each."""
    base = item.nodeid.split("[", 1)[0]
    if tier == "documented" or (tier == "processes" and any(base.startswith(h) for h in HEAVY)):
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
    if _children and tier not in ("processes", "documented"):
        first = " ".join(_children[0])[:200]
        pytest.fail(
            f"{request.node.nodeid} ({tier}) started {len(_children)} Python process(es), e.g. "
            f"`{first}`: add it to PROCESSES in tests/conftest.py (kept from overlapping "
            "other process tests under xdist), or check it in process (cli_in_process)",
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
