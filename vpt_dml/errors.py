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
