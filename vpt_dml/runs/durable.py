"""A file's rename survives a power cut only once its folder is synced (POSIX). Shared by
the checkpoint writer (runs/checkpoint_io.py) and the record (runs/record.py), and free of
Lightning: the readers of a run's record import it."""

from __future__ import annotations

import os
from pathlib import Path


def sync_folder(folder: Path) -> None:
    """fsync the folder, so that the renames in it are on disk (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
