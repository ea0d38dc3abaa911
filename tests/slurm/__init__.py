"""Tests through a real one-node Slurm (a package: its conftest must not shadow tests/conftest.py)."""
