# Verbs for a newcomer: `make test`, `make bench`, `make examples`, `make lint`.
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

.PHONY: install build test bench examples lint clean
.PHONY: test-slow test-wheel sanitize

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

# Tests marked slow (outputs past 2**31 elements, several GiB) run in test-slow.
test: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

test-slow: install
	$(PY) -m pytest -q -p no:cacheprovider -m slow tests

# The wheel, built from the sdist, installed into a venv of its own (torch 2.13.0,
# no source tree) and smoke-tested from outside the repository.
WHEEL_VENV := .venv-wheel
WHEEL_SMOKE := tests/test_show_config.py tests/test_op_registration.py \
	tests/test_linear_backends.py::test_backend_small_cases tests/test_conv_backends.py::test_splora_conv_backend
test-wheel: $(STAMP)
	tools/test_wheel.sh $(PY) $(WHEEL_VENV) -q $(WHEEL_SMOKE)

# The cpu backend's tests under AddressSanitizer and UndefinedBehaviorSanitizer,
# on a build of its own in build-sanitize/ (the in-place build is not touched).
SANITIZE_TESTS := tests/test_linear_backends.py tests/test_conv_backends.py tests/test_validation.py
sanitize: $(STAMP)
	tools/sanitize.sh $(PY) -q $(addprefix $(CURDIR)/,$(SANITIZE_TESTS)) -k "not triton"

bench: install
	$(PY) -m bench

examples: install
	for example in $(EXAMPLES); do $(PY) -m $$example || exit 1; done

lint: $(STAMP)
	$(PY) -m ruff check spa_kernels tests bench examples

clean:
	rm -rf build spa_kernels/*.so $(VENV)
	rm -rf build-sanitize build-wheel $(WHEEL_VENV)
