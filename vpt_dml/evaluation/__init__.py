"""Evaluation: exact retrieval metrics (`retrieval`, fast search in `knn`) and clustering."""

from vpt_dml.evaluation.clustering import clustering_metrics
from vpt_dml.evaluation.knn import candidate_dtype_report
from vpt_dml.evaluation.retrieval import retrieval_metrics

__all__ = ["candidate_dtype_report", "clustering_metrics", "retrieval_metrics"]
