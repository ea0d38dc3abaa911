"""User-facing errors: one line that names the problem and the fix.

`vpt_dml.run` and the other CLIs catch `UserError` and print its message instead of a
traceback, then exit non-zero.
"""


class UserError(ValueError):
    """Bad input from the user (config, data, weights): message names problem and fix."""

    def __init__(self, message: str = "") -> None:
        # A DataLoader worker re-raises as type(f"Caught X in DataLoader worker...{traceback}"):
        # keep only the original one-line message, which is the traceback's last line.
        if (
            isinstance(message, str)
            and message.startswith("Caught ")
            and "Original Traceback" in message
        ):
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


class DatasetError(UserError):
    """A dataset on disk is missing, incomplete or corrupt."""


class WeightsError(UserError):
    """Pretrained weights could not be loaded."""


class DiskFull(UserError):
    """No space left for a checkpoint; the earlier checkpoints are intact."""


class ArchiveError(UserError):
    """An archive that must not be used (wrong hash, unsafe member)."""


class DownloadError(UserError):
    """A dataset archive could not be downloaded."""


class UndecodableImage(DatasetError):
    """An image file that exists but cannot be decoded (the only kind that may be skipped).

    Constructible from the message alone: DataLoader workers re-raise it that way."""

    def __init__(self, message: str, path: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.path, self.reason = path, reason


class LayoutNotFound(DatasetError):
    """data.root does not hold a dataset's official layout; says which one was expected."""

    def __init__(self, message: str, what: str, expected: str, source: str) -> None:
        super().__init__(message)
        self.what, self.expected, self.source = what, expected, source


# -- not bad input: how a run ended, each with its own exit code (vpt_dml/run.py) ---------
class Diverged(Exception):
    """Training produced NaN / inf; the message is the one line to print, `info` goes to
    metrics.json (exit 3: not 2, bad input, nor 1, a crash)."""

    def __init__(self, message: str, info: dict | None = None) -> None:
        super().__init__(message)
        self.info = dict(info or {})


class Interrupted(Exception):
    """SIGTERM stopped training; the message says what was saved (exit 143)."""


class WrongSweepFolder(UserError):
    """The sweep folder holds runs of another config: the whole sweep stops (a job that
    went on would mix two configs in one folder)."""


class Skip(Exception):
    """This sweep job already finished; `.value` is what it returned then; `failed`: it
    had diverged (skipped, since it would diverge again, but still a failed job)."""

    def __init__(self, message: str, value: float | None, failed: bool = False) -> None:
        super().__init__(message)
        self.value = value
        self.failed = failed
