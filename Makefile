# One-command entry points; each target installs the venv first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp
# torch/torchvision pinned to the builds this workplace keeps on local disk (pip finds them offline).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

# Keep Python's bytecode cache and pytest's rewritten test modules (__pycache__/, git-ignored):
# with PYTHONDONTWRITEBYTECODE set, every pytest worker re-rewrites ~230 test modules and
# every child process re-compiles vpt_dml, each time.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install demo test test-full test-fast lint bench gpu-check-wheels clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev,wandb,peft,slurm,onnx]"
	touch $(STAMP)

# overwrite=true: a run folder belongs to one run, and `make demo` replaces its own last one
demo: install
	$(PY) -m vpt_dml.run hydra.run.dir=outputs/demo overwrite=true

# Tiers are folders: tests/unit, tests/runs (in process), tests/processes (tests/slurm too),
# tests/documented; tests/conftest.py marks each test with its folder's tier. `make test`:
# every proof but the end-to-end runs of the documented commands and of gpu_check.py
# --cpu --tiny, and the real-Slurm tests; `make test-full`: everything (CI: .ci/run).
# Two xdist workers, one torch thread each; the tests that keep both cores busy (marked
# both_cores) run one at a time (xdist_group "processes"), and so do the Slurm
# tests (group "slurm"). Each run writes its timings to experiments/results/.
PYTEST_WORKERS ?= 2
FULL_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup

test: install
	$(PYTEST) -m "not documented and not slurm" \
		--durations-file=experiments/results/test_durations_test.txt

# test-full: FULL_WORKERS=3 fills the cores while the Slurm tests wait on Slurm, but three
# workers on 2 cores cost ~30% more CPU (make test: 344 s with 3 against 290 s with 2)
test-full: install
	$(PY) -m pytest -q -n $(FULL_WORKERS) --dist loadgroup \
		--durations-file=experiments/results/test_durations_test-full.txt

test-fast: install
	$(PYTEST) -m unit

lint: install
	# float32 comparisons need a dtype-derived tolerance (tests/check_tolerances.py says which)
	$(PY) tests/check_tolerances.py
	$(VENV)/bin/ruff check vpt_dml tests experiments
	$(VENV)/bin/ruff format --check vpt_dml tests experiments
	# the layers of docs/design.md (pyproject.toml [tool.importlinter]): imports run downward only
	$(VENV)/bin/lint-imports

bench: install
	$(PY) experiments/bench_eval.py
	$(PY) experiments/bench_train_step.py
	$(PY) experiments/bench_classes.py
	$(PY) experiments/bench_data.py

# Wheels the GPU machine lacks (it reaches no registry); carried as .whl/ by the device
# tool's `carry` (see experiments/gpu_check.py's docstring for the whole call).
gpu-check-wheels: install
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 -d .whl hydra-core==1.3.8 omegaconf==2.3.1
	$(PY) -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w .whl

clean:
	rm -rf outputs multirun .pytest_cache
