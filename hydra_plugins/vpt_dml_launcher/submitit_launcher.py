"""Hydra instantiates launchers only from the `hydra_plugins` namespace package: the class
conf/hydra/launcher/slurm.yaml names lives here; its code is vpt_dml/runs/submitit_launcher.py.
Hydra imports every plugin module at start-up: without the `slurm` extra
(hydra-submitit-launcher) this one defines nothing instead of failing."""

try:
    from vpt_dml.runs.submitit_launcher import CheckedSlurmLauncher
except ImportError:
    CheckedSlurmLauncher = None

if CheckedSlurmLauncher is not None:

    class SlurmLauncher(CheckedSlurmLauncher):
        """hydra/launcher=slurm: submitit's SLURM launcher, checked and quiet."""
