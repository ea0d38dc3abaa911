"""Hydra instantiates launchers only from the `hydra_plugins` namespace package: the class
conf/hydra/launcher/slurm.yaml names lives here; its code is vpt_dml/runs/submitit_launcher.py."""

from vpt_dml.runs.submitit_launcher import CheckedSlurmLauncher


class SlurmLauncher(CheckedSlurmLauncher):
    """hydra/launcher=slurm: submitit's SLURM launcher, checked and quiet."""
