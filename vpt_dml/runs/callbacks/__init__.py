"""Lightning callbacks of the suite (exact resume, the retrieval images, cost, progress,
loggers), each named by its module in conf/ (e.g. vpt_dml.runs.callbacks.dashboard.Dashboard).
Nothing is imported here: reading a run's record (runs/record.py) needs no Lightning."""
