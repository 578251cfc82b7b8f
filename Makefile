# `make demo` and `make test` work on a fresh machine: they create .venv and install everything first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A CPU torch wheel lies on disk; any other torch requirement downloads gigabytes of CUDA packages.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/spectralscope demo

lint: install
	$(VENV)/bin/ruff check .

# The browser tests drive Debian's chromium with Playwright (never `playwright install`).
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	command -v apt-get >/dev/null && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium not installed: the browser tests will be skipped"

test: install lint $(CHROMIUM)
	$(PY) -m pytest -q -ra

# peers.py measures against WeightWatcher and PyHessian (the bench extra); gpu.py needs CUDA and is run by hand.
bench: install
	$(PY) -m pip install -q -e ".[dev,bench]"
	$(PY) benchmarks/spectra.py
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/overhead.py --demo
	$(PY) benchmarks/overhead.py --demo --all-instruments
	$(PY) benchmarks/instruments.py
	$(PY) benchmarks/demo_cost.py
	$(PY) benchmarks/demo_jobs.py
	$(PY) benchmarks/peers.py
	$(PY) benchmarks/dashboard.py

clean:
	rm -rf $(VENV) build dist *.egg-info runs .pytest_cache .ruff_cache
