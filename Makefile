# `make test` and `make bench` each do the whole setup on a fresh machine, then run.
PYTHON ?= python3
# torch is installed only when `import torch` fails; override e.g. TORCH_SPEC="torch==2.11.0".
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
BENCH_ARGS ?=
# The versions the tests ran against in CI (pip's -c); `make test-latest` tries the newest ones.
CONSTRAINTS := constraints.txt
LATEST_VENV ?= .venv-latest

SOURCES := setup.py $(CONSTRAINTS) $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cpp csrc/cuda/*.cu csrc/cuda/*.h)

.PHONY: setup test test-fast bench test-latest constraints clean

setup: .build-stamp

.build-stamp: $(SOURCES)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install --no-build-isolation -c $(CONSTRAINTS) -e ".[test]"
	@touch $@

test: setup
	$(PYTHON) -m pytest tests $(PYTEST_ARGS)

# The quick loop while developing: everything but the tests marked slow (tests/conftest.py).
test-fast: setup
	$(PYTHON) -m pytest tests -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PYTHON) bench/throughput.py $(BENCH_ARGS)

# The whole suite against the newest releases of every dependency but torch, in a fresh venv
# beside the tree: run it before bumping the pins with `make constraints`.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install "$(TORCH_SPEC)" setuptools wheel
	$(LATEST_VENV)/bin/python -m pip install --upgrade --no-build-isolation -e ".[test]"
	$(LATEST_VENV)/bin/python -m pip list
	$(LATEST_VENV)/bin/python -m pytest tests $(PYTEST_ARGS)

# Pins what is installed now (after `make test-latest` passed with it, in that venv:
# make constraints PYTHON=$(LATEST_VENV)/bin/python).
constraints:
	$(PYTHON) .ci/pin_constraints.py $(CONSTRAINTS)

clean:
	rm -rf build *.egg-info msplora_kernels/_C*.so .build-stamp
