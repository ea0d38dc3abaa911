"""vpt_dml: parameter-efficient fine-tuning for deep metric learning (VPTSP-G)."""

__version__ = "0.1.0"
