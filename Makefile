# Two commands on a fresh machine:  `make quickstart` (set up + run the main job), `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines pin torch to the build on disk; set CONSTRAINTS= on a GPU cluster.
CONSTRAINTS ?= launch/constraints-cpu.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: setup quickstart test lint bench-quick

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(CONSTRAINTS),$(PY) -m pip install -q $(PIP_C) torch)
	$(PY) -m pip install -q $(PIP_C) -e '.[dev]'
	touch $@

quickstart: setup
	$(VENV)/bin/seqpar env
	$(VENV)/bin/seqpar demo --nproc 2

test: setup
	$(PY) -m pytest -q --durations=20 tests

lint: setup
	$(VENV)/bin/ruff check .
