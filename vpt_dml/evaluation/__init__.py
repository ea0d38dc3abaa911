"""Evaluation: exact retrieval metrics (`retrieval`, fast search in `knn`) and clustering."""

from vpt_dml.evaluation.clustering import clustering_metrics
from vpt_dml.evaluation.retrieval import retrieval_metrics

__all__ = ["clustering_metrics", "retrieval_metrics"]
