"""Hydra instantiates launchers only from the `hydra_plugins` namespace package: the classes
conf/hydra/launcher/slurm.yaml and local.yaml name live here; their code is
vpt_dml/runs/submitit_launcher.py. Hydra imports every plugin module at start-up: without
the `slurm` extra (hydra-submitit-launcher) this one defines nothing instead of failing."""

try:
    from vpt_dml.runs.submitit_launcher import CheckedLocalLauncher, CheckedSlurmLauncher
except ImportError:
    CheckedSlurmLauncher = CheckedLocalLauncher = None

if CheckedSlurmLauncher is not None:

    class SlurmLauncher(CheckedSlurmLauncher):
        """hydra/launcher=slurm: submitit's SLURM launcher, checked and quiet."""

    class LocalLauncher(CheckedLocalLauncher):
        """hydra/launcher=local: submitit's local executor; failed jobs named at once."""
