"""`python -m vpt_dml.run [+experiment=NAME] [overrides]`: train, evaluate, record.

Writes into the run folder (hydra.run.dir): checkpoints/, csv/metrics.csv,
metrics.json (before / final / best metrics, cost and provenance: vpt_dml/runs/record.py),
config_resolved.yaml (written at start).
Bad input ends in one `error:` line and exit 2 (`debug=true` or HYDRA_FULL_ERROR=1 show the
traceback); SIGTERM ends in exit 143 with metrics.json marked "status": "interrupted"; a NaN/inf loss
or weights end in exit 3 with "status": "diverged" (runs/callbacks/divergence.py). In a sweep
run inside this process (Hydra's own launcher) a failed job is recorded and the next one
runs; the sweep ends with one `failed:` line per failed job (runs/sweep.py).
The recipe is vpt_dml/train.py; the run around it is vpt_dml/runs/lifecycle.py.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from vpt_dml.errors import Diverged, Interrupted, Skip, UserError, WrongSweepFolder
from vpt_dml.runs import cluster, completion, sweep
from vpt_dml.runs.command_line import check_command_line, one_line
from vpt_dml.runs.search import check_search, in_optuna_search

# The training stack (torch, Lightning, timm: ~8 s of imports) is imported once a run is
# certain: `-sc install=bash` (a shell's startup file), `--help` and a refused command line
# answer at once.

log = logging.getLogger("vpt_dml")
# faiss logs each missing CPU-specific build it probes (avx512, avx2) as an error-looking line
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

# A shell reports a process ended by SIGTERM as 128 + 15; schedulers read it as "killed".
SIGTERM_EXIT = 128 + signal.SIGTERM


def __getattr__(name: str):
    # In-process use (a notebook, the tests): `train`, one whole run, folder, record and all
    if name == "train":
        from vpt_dml.runs.lifecycle import run_training

        return run_training
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# cli(watchdog=True): this process is the run, and main() arms the SIGTERM watchdog (a
# process-wide timer); cli(watchdog=False) runs in a process with other work (the tests)
_process_is_the_run = {"watchdog": False}


def stop_interrupted(line: str) -> None:
    """Exit 143 after an interruption: the `interrupted:` line, the SLURM requeue when one
    was asked for, and an exit bounded in time whatever the shutdown waits for."""
    from vpt_dml import distributed
    from vpt_dml.runs.sigterm import exit_within, timeout_from_env

    exit_within(timeout_from_env())
    if distributed.is_global_zero():  # rank 0 speaks for the run
        print(f"interrupted: {line}", file=sys.stderr)
    if requeued := cluster.requeue_if_asked():
        print(requeued, file=sys.stderr)
    if cluster.lightning_child_rank():
        # Lightning's launcher SIGKILLs rank 0 (its parent) when a child ends non-zero:
        # rank 0's exit code is the run's (Lightning's own SIGTERM exit is 0 too)
        sys.exit(0)
    sys.exit(SIGTERM_EXIT)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from vpt_dml import distributed
    from vpt_dml.runs.callbacks.divergence import DIVERGED_EXIT
    from vpt_dml.runs.callbacks.wandb_logger import finish_wandb
    from vpt_dml.runs.lifecycle import enter_job, run_training
    from vpt_dml.runs.sigterm import enable_watchdog, end_together, sigterm_received

    if _process_is_the_run["watchdog"]:  # SIGTERM ends this process in bounded time (sigterm.py)
        enable_watchdog()
    debug = bool(cfg.get("debug", False)) or os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        if sigterm_received():  # between two jobs of a sweep
            stop_interrupted(
                "SIGTERM came between two jobs of the sweep: the jobs before it are complete; "
                "rerun the same command to run the rest"
            )
        enter_job(cfg)  # ranks, requeued job / sweep rerun (resume, skip), SIGUSR
        check_search(cfg)  # an Optuna trial's objective is never the test split's
        metrics = run_training(cfg)
        # every rank waits for rank 0's record; too late to stop the run, which finished:
        # stop the process (on every rank, if any rank got the signal)
        if end_together(stopped=False):
            stop_interrupted(
                "SIGTERM came as the run finished; its metrics.json is complete "
                "(a sweep rerun skips it)"
            )
    except Skip as e:
        print(e, file=sys.stderr)
        if e.failed and sweep.in_process_sweep():
            sweep.record_failed_job(DIVERGED_EXIT, "diverged in an earlier run (skipped)")
        return e.value
    except Interrupted as e:
        end_together(stopped=True)  # rank 0 has written metrics.json before any rank leaves
        stop_interrupted(str(e))
    except SIGTERMException:  # outside fit: the evaluation before training or the final test
        end_together(stopped=True)
        stop_interrupted(
            "SIGTERM outside training (evaluation before it, or the final test); "
            "metrics.json was not written"
        )
    except Diverged as e:  # metrics.json says "status": "diverged" (callbacks/divergence.py)
        print(f"diverged: {e}", file=sys.stderr)
        if in_optuna_search() and not sweep.in_process_sweep():
            return None  # a submitit trial: failed (no value), the study goes on
        return sweep.job_failed(DIVERGED_EXIT, f"diverged: {e}")
    except (UserError, InstantiationException) as e:
        if debug:
            raise
        if distributed.is_global_zero():  # every DDP rank hits the same error
            print(f"error: {one_line(e)}", file=sys.stderr)
        if isinstance(e, WrongSweepFolder):  # not this job's fault: the sweep stops
            sys.exit(2)
        return sweep.job_failed(2, f"error: {one_line(e)}")
    except Exception as e:  # a crash: its traceback, and in a sweep the next job still runs
        if not sweep.in_process_sweep():
            raise
        traceback.print_exc()
        return sweep.job_failed(1, f"crashed: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
    finally:
        finish_wandb()  # the next job of a sweep opens its own W&B run
    # the value a Hydra sweeper (e.g. optuna) optimises; under data.val_classes>0 the
    # validation classes' (metrics.json `final`, runs/search.py)
    return metrics.get("recall@1")


def cli(argv: list[str] | None = None, *, watchdog: bool = True) -> None:
    """`python -m vpt_dml.run`: what Hydra would answer with a traceback or would not
    complete, answered before it parses the command line. In process (the tests' exit
    codes and error lines): `cli(argv, watchdog=False)` arms no process-wide watchdog."""
    if argv is None:
        argv = sys.argv[1:]
    else:  # Hydra parses sys.argv
        sys.argv = [sys.argv[0], *argv]
    action = completion.requested(argv)
    if action:
        print(completion.script(action), end="")
        return
    _process_is_the_run["watchdog"] = watchdog
    try:
        check_command_line(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    cluster.pin_run_stamp()  # torchrun workers / a requeued SLURM job share one run folder
    try:
        main()
    except SystemExit:  # an interrupted sweep still names the jobs that failed before it
        sweep.report_failed_jobs()
        raise
    if (code := sweep.report_failed_jobs()) is not None:  # a sweep with failed jobs
        sys.exit(code)
    from vpt_dml.runs.sigterm import sigterm_received

    if sigterm_received():  # noted after the run's last check: its record is complete
        stop_interrupted("SIGTERM came as the run ended; its metrics.json is complete")


if __name__ == "__main__":
    cli()
