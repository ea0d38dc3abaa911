"""An Optuna search (`+hparams_search=optuna`) around the runs: the honest objective, the
persistent study, the best trial.

- Objective: the Recall@1 of the held-out validation classes (data.val_classes>0), the
  value `vpt_dml.run` returns to the sweeper (metrics.json `final`, split "validation classes",
  under data.val_classes>0). Without validation classes it would be the test split's:
  `check_search` refuses that before a trial trains.
- The study lives in the search folder (hydra.sweep.dir, no date in it) as study.db
  (sqlite); rerunning the command loads it and adds hydra.sweeper.n_trials trials, each
  in its own dated job folder. `StudyFolder` (a Hydra callback) makes the folder before
  the sweeper opens the database and, when the sweep ends, writes best_trial.yaml beside
  it: value, params, the full overrides and a command that reruns them with five seeds.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vpt_dml.errors import UserError

log = logging.getLogger("vpt_dml")

BEST_FILE = "best_trial.yaml"


def in_optuna_search() -> bool:
    """This job is a trial of an Optuna sweep (the sweeper's value is what it returns)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False
    hc = HydraConfig.get()
    target = str((hc.get("sweeper") or {}).get("_target_", ""))
    return hc.mode == RunMode.MULTIRUN and "optuna" in target.lower()


NO_VALIDATION = (
    "an Optuna search optimises the held-out validation classes' Recall@1, and "
    "data.val_classes=0 would make it the test split's: set data.val_classes>0 "
    "(+hparams_search=optuna sets 0.25)"
)


def check_search(cfg: DictConfig) -> None:
    """Refuse a trial whose objective would read the test split (`StudyFolder` refuses the
    whole search first; this catches a trial whose own overrides zero it)."""
    if in_optuna_search() and not (cfg.get("data") or {}).get("val_classes"):
        raise UserError(NO_VALIDATION)


def _refuse(line: str) -> None:
    """Before any trial: one line and exit 2, as every refused command."""
    print(f"error: {line}", file=sys.stderr)
    sys.exit(2)


def _storage_path(storage: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(storage[len(prefix) :]) if storage.startswith(prefix) else None


def trial_folder(sweep_dir: Path, params: dict) -> str | None:
    """The job folder whose overrides hold exactly these sampled values (Hydra keeps each
    job's overrides in .hydra/overrides.yaml)."""
    wanted = {f"{k}={v}" for k, v in params.items()}
    for overrides in sorted(Path(sweep_dir).glob("*/.hydra/overrides.yaml")):
        if wanted <= set(OmegaConf.load(overrides)):
            return str(overrides.parent.parent)
    return None


def best_trial_record(storage: str, study_name: str, val_classes: Any) -> dict | None:
    """best_trial.yaml's content from the stored study (None: no finished trial)."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return None
    best = study.best_trial
    # the sweeper keeps the command line's fixed overrides as user attributes
    fixed = {k: v for k, v in best.user_attrs.items() if "hparams_search" not in k}
    overrides = [f"{k}={v}" for k, v in {**fixed, **best.params}.items()]
    if not any(o.split("=", 1)[0].lstrip("+~") == "data.val_classes" for o in overrides):
        overrides.append(f"data.val_classes={val_classes}")
    command = ["python", "-m", "vpt_dml.run", "-m", *overrides, "+hparams_search=seeds"]
    return {
        "study": study_name,
        "storage": storage,
        "objective": "validation recall@1 (held-out training classes), maximised",
        "trials_complete": len(done),
        "trials_total": len(study.trials),
        "best": {"trial": best.number, "value": best.value, "params": dict(best.params)},
        "overrides": overrides,
        "rerun_with_seeds": " ".join(shlex.quote(c) for c in command),
    }


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra-core < 1.1
    Callback = object  # type: ignore[misc,assignment]


def fixed_overrides(task_overrides: list[str]) -> dict[str, str]:
    """The command line's fixed settings as the sweeper stores them on each trial."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    return {k: str(v) for k, v in create_params_from_overrides(list(task_overrides))[1].items()}


def study_mismatch(storage: str, study_name: str, fixed: dict[str, str]) -> list[str]:
    """Fixed settings this command gives differently from the stored study's trials (a
    study whose trials ran other settings would rank unlike runs against each other)."""
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # no such study yet
        return []
    stored: dict[str, str] = {}
    for t in study.trials:
        stored.update({k: str(v) for k, v in t.user_attrs.items()})
    return sorted(k for k in set(stored) | set(fixed) if stored.get(k) != fixed.get(k))


class StudyFolder(Callback):
    """hydra.callbacks entry of +hparams_search=optuna (see the module docstring)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not OmegaConf.select(config, "data.val_classes"):
            _refuse(NO_VALIDATION)
        sweeper = config.hydra.sweeper
        path = _storage_path(str(sweeper.storage or ""))
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)  # sqlite does not make folders
        task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
        differ = study_mismatch(
            str(sweeper.storage), str(sweeper.study_name), fixed_overrides(task)
        )
        if differ:
            shown = ", ".join(differ[:4]) + (" ..." if len(differ) > 4 else "")
            _refuse(
                f"the study {sweeper.study_name} in {path} ran with other fixed settings "
                f"({shown} differ); continue it with the same command, or give "
                "hydra.sweeper.study_name=<new> (or another hydra.sweep.dir)"
            )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweeper = config.hydra.sweeper
        if not sweeper.storage:
            return
        val = OmegaConf.select(config, "data.val_classes")
        record = best_trial_record(str(sweeper.storage), str(sweeper.study_name), val)
        if record is None:
            log.warning("optuna: no trial finished; %s not written", BEST_FILE)
            return
        path = Path(str(config.hydra.sweep.dir)) / BEST_FILE
        record["best"]["folder"] = trial_folder(path.parent, record["best"]["params"])
        OmegaConf.save(OmegaConf.create(record), path)
        best = record["best"]
        log.info(
            "optuna: best of %d trials: trial %d, validation recall@1 %.4f (%s)\n  rerun with seeds: %s",
            record["trials_complete"], best["trial"], best["value"], path,
            record["rerun_with_seeds"],
        )  # fmt: skip
