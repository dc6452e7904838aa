# Set-up and everyday commands. `make install` then `make test` (or `make test-all`) is all a new machine needs.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch; override for CUDA, e.g. `make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"`.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install test test-all train teachers cache bench results results-lm results-smoke bench-gpu docs lint format clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"

# The fast suite (a few minutes); `make test-all` adds the slow tests (real subprocesses, DDP,
# notebooks, the wheel), which CI runs.
test:
	WANDB_MODE=disabled $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all:
	WANDB_MODE=disabled $(BIN)/python -m pytest $(PYTEST_ARGS)

train:
	$(BIN)/kd-train $(ARGS)

teachers:
	$(BIN)/kd-teachers $(ARGS)

cache:
	$(BIN)/kd-cache $(ARGS)

bench:
	$(BIN)/kd-bench --json bench.json

# On a machine with a GPU (under 8 minutes): fast paths, LM workloads, teacher offload, one JSON.
bench-gpu:
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python -m kd_lightning.bench.gpu --json bench-gpu.json

# The MNIST-1D table and plots in results/mnist1d/ (about 7 h on 2 CPU cores; rerun to continue).
results:
	$(BIN)/kd-results --preset full --jobs 2 $(ARGS)

# The standard-library LM table and validation curves in results/lm/ (3 seeds; rerun to continue).
results-lm:
	$(BIN)/kd-results --preset lm $(ARGS)

results-smoke:
	$(BIN)/kd-results --preset smoke --out results-smoke $(ARGS)

# The documentation site (docs/, API reference from the docstrings) into site/.
docs:
	$(BIN)/mkdocs build --strict

lint:
	$(BIN)/ruff check kd_lightning tests
	$(BIN)/ruff format --check kd_lightning tests
	$(BIN)/mypy kd_lightning

format:
	$(BIN)/ruff format kd_lightning tests
	$(BIN)/ruff check --fix kd_lightning tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache outputs multirun lightning_logs logs bench.json bench-gpu.json site
