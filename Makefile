# Two commands on a fresh machine:  `make quickstart` (set up + run the main job), `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines pin torch to the build on disk; set CONSTRAINTS= on a GPU cluster.
CONSTRAINTS ?= launch/constraints-cpu.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: setup quickstart demo test test-gpu lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(CONSTRAINTS),$(PY) -m pip install -q $(PIP_C) torch)
	$(PY) -m pip install -q $(PIP_C) -e '.[dev]'
	$(PY) -m seqpar.kernels.linear_cpu || echo "(the PyTorch linear-attention kernel will be used)"
	touch $@

# The main job: the CPU quick-start recipe (tiny Llama, passkey data, S2-Attn over 2 SP ranks, LoRA, ZeRO-2).
quickstart: setup
	$(VENV)/bin/seqpar env
	$(VENV)/bin/torchrun --nproc_per_node 2 -m seqpar train recipes/quickstart-cpu.yaml

demo: setup
	$(VENV)/bin/seqpar demo --nproc 2

test: setup
	$(PY) -m pytest -q --durations=20 tests

test-gpu: setup
	$(PY) -m pytest -q -rs tests/gpu

lint: setup
	$(VENV)/bin/ruff check .
