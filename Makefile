# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment it needs (torch 2.13.0 CPU build; BackPACK --no-deps).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.hogc-installed

.PHONY: demo test bench schedules peers env clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# BackPACK is a test reference; --no-deps keeps pip from pulling a GPU build of torch
	$(PY) -m pip install -q --no-deps backpack-for-pytorch unfoldNd
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(PY) -m hogc.demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/first_order.py --threads 2

# contraction schedules and memory budgets: writes docs/schedules.md and docs/schedules.png
schedules: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/schedules.py --threads 2

# hogc against BackPACK, curvlinops, ASDL and torch.func: writes docs/peers.md and docs/peers.png.
# The peers go in with --no-deps (their torch requirement would pull a GPU build), their own
# pure-Python needs listed explicitly.
peers: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m pip install -q --no-deps curvlinops-for-pytorch asdfghjkl scipy tqdm einconv linear_operator jaxtyping
	cd benchmarks && ../$(PY) peers.py --threads 2 --inductor

clean:
	rm -rf $(VENV) build *.egg-info
