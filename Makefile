# Verbs for a newcomer: `make test`, `make bench`, `make examples`, `make lint`;
# `make cuda-check` (nvcc only, no GPU) and `make gpu-check` (on a GPU machine).
# Each sets up what it needs in .venv first (torch from the local CPU build,
# the extension built in place with ninja), so a fresh clone needs nothing else.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# numpy < 2.4: the Triton 3.6 interpreter cannot take loop bounds from NumPy 2.4 arrays.
TEST_DEPS := "numpy<2.4" ninja pybind11 setuptools wheel pytest pytest-timeout hypothesis rich ruff triton==3.6.0 scikit-learn matplotlib
# sp_adapters is the reference library the modules interoperate with; it and
# torch-pruning (which it imports) need only torch and numpy, so skip their deps.
NO_DEPS := structured-pruning-adapters==0.7.1 torch-pruning==1.6.1

.PHONY: install build test bench examples lint clean cuda-check gpu-check

# The seed papers' methods on scikit-learn's digits; each writes a PNG and a table to examples/out/.
EXAMPLES := examples.adaptive_pruning examples.layerwise_sls examples.spa_vs_finepruning

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet $(TEST_DEPS)
	$(PIP) install --quiet --no-deps $(NO_DEPS)
	touch $(STAMP)

install: $(STAMP) build

build: $(STAMP)
	$(PY) setup.py --quiet build_ext --inplace

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: install
	$(PY) -m bench

examples: install
	for example in $(EXAMPLES); do $(PY) -m $$example || exit 1; done

lint: $(STAMP)
	$(PY) -m ruff check spa_kernels tests bench examples

# Every csrc/cuda/*.cu through nvcc and ptxas for sm_80 and sm_90; fails on spills or local memory.
cuda-check:
	$(PYTHON) tools/cuda_check.py

# The one run a GPU machine needs: build, GPU tests, bench, compute-sanitizer; writes bench/results/.
# Uses .venv when it exists (with a CUDA build of torch), else python3; installs nothing.
gpu-check:
	PY=$(PY) bash tools/gpu_check.sh

clean:
	rm -rf build spa_kernels/*.so $(VENV)
