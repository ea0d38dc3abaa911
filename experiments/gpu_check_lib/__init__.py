"""The library behind experiments/gpu_check.py (the script: its docstring, options and
entry point), a module per job:

- `layouts`: fake dataset copies with real JPEGs (a spawned process Pool);
- `probe`: the measuring callback inside each run (only what metrics.json lacks);
- `checks`: metrics in [0, 1], finite losses, the csv;
- `projection`: the full preset's wall time on the real dataset sizes;
- `smoke`: the smoke phase (every CUDA path a few steps, before the measured runs);
- `presets`: the measured runs and what they report;
- `benches`: experiments/bench_*.py within the budget;
- `processes`: child processes, their environment and logs;
- `check`: the whole check, in order.
"""
