"""Everything around one run (the ring around the method; see docs/design.md).

Config schema and rules, command-line checks, the run folder and its lock, resume, sweep
rerun, cluster and requeue, SIGTERM, atomic checkpoint io, the record (metrics.json),
summary, provenance, trainer assembly and the suite's callbacks (runs/callbacks/).
The method (models/, losses/, data/, evaluation/, module.py, train.py) never imports it.
"""
