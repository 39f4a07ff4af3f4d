# Two entry points for a fresh machine: `make demo` (set up + run the lab) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

# torch is pinned to the CPU wheel first; an unpinned torch would pull GBs of CUDA packages.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/relex lab --profile default --out runs/lab-default --overwrite

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_extrapolate.py --model small

clean:
	rm -rf $(VENV) runs build src/*.egg-info
