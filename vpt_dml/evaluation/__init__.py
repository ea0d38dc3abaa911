from vpt_dml.evaluation.retrieval import retrieval_metrics

__all__ = ["retrieval_metrics"]
