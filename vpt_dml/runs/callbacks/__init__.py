"""Lightning callbacks of the suite: exact resume and the retrieval images."""

from vpt_dml.runs.callbacks.dashboard import Dashboard
from vpt_dml.runs.callbacks.exact_resume import ExactResume

__all__ = ["Dashboard", "ExactResume"]
