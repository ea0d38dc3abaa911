"""Pieces of `python -m vpt_dml.report`: which runs form one configuration (`grouping`),
jobs that left no final metrics (`jobs`), the cost-accuracy frontier plot (`frontier`)."""
