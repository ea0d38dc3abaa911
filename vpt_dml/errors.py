"""User-facing errors: one line that names the problem and the fix.

`vpt_dml.run` and the other CLIs catch `UserError` and print its message instead of a
traceback, then exit non-zero.
"""


class UserError(ValueError):
    """Bad input from the user (config, data, weights): message names problem and fix."""


class DatasetError(UserError):
    """A dataset on disk is missing, incomplete or corrupt."""


class WeightsError(UserError):
    """Pretrained weights could not be loaded."""
