# `make test` and `make bench` each do the whole setup on a fresh machine, then run.
PYTHON ?= python3
# torch is installed only when `import torch` fails; override e.g. TORCH_SPEC="torch==2.11.0".
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
BENCH_ARGS ?=

SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cpp csrc/cuda/*.cu csrc/cuda/*.h)

.PHONY: setup test bench clean

setup: .build-stamp

.build-stamp: $(SOURCES)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install --no-build-isolation -e ".[test]"
	@touch $@

test: setup
	$(PYTHON) -m pytest tests $(PYTEST_ARGS)

bench: setup
	$(PYTHON) bench/throughput.py $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info msplora_kernels/_C*.so .build-stamp
