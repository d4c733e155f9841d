# Verbs for a newcomer: `make test`, `make bench`, `make examples`, `make lint`;
# `make cuda-check` (nvcc only, no GPU) and `make gpu-check` (on a GPU machine).
# Each sets up what it needs in .venv first (torch from the local CPU build,
# the extension built in place with ninja), so a fresh clone needs nothing else.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Unpinned and upgraded: the tests run on the newest Triton and NumPy the index
# serves, as a new user's would. transformers builds Hugging Face models from configs
# in the model tests (it does not pull torch; nothing is downloaded).
TEST_DEPS := numpy ninja pybind11 setuptools wheel pytest pytest-timeout hypothesis rich ruff triton scikit-learn matplotlib transformers
# sp_adapters is the reference library the modules interoperate with; it and
# torch-pruning (which it imports) need only torch and numpy, so skip their deps.
NO_DEPS := structured-pruning-adapters==0.7.1 torch-pruning==1.6.1

# The Triton backend's test files (run in Triton's interpreter on a CPU-only machine).
TRITON_TESTS := tests/backends/test_triton_linear.py tests/backends/test_triton_conv.py tests/backends/test_triton_splopa.py
# `make test-triton-versions` runs them under each of these releases, each in a
# venv of its own (.venv-triton-<version>, made once and reused) with the same
# torch, so the in-place extension serves them all.  The newest release runs the
# whole of TRITON_TESTS in `make test`; here, to keep CI short, each runs only
# TRITON_SUBSET (`make test-triton-versions TRITON_SUBSET=` runs everything):
# linear and conv against float64, forward and every gradient, in float32 on the
# shapes that break kernels most often (primes, one row, every channel pruned,
# one channel, a rank above one block, 3-d input; conv with stride, dilation,
# padding past the centre, a stride larger than the input, 1-d and 3-d, SPPaRA),
# bf16 and fp16 on a few of those, the backward returning only what is asked,
# kernels never touching pruned outputs (plain and transposed), int32 indices.
TRITON_VERSIONS := 3.7 3.8 3.9
TRITON_SUBSET_TESTS := \
	primes-weight-grad all-ones all-pruned one-channel keep0.1-rank20 3d-x \
	2d-stride2-dilation2-pad0 2d-padding-beyond-centre 2d-stride-exceeds-input 1d-stride4-dilation6-weight-grad \
	3d-3x3x3-batch1 rank17 sppara-stride2-pad0-weight-grad sppara-3d-batch1 \
	returns_only_what_is_asked never_touch_inactive_outputs int32_indices
space := $(subst ,, )
TRITON_SUBSET := -k "$(subst $(space), or ,$(strip $(TRITON_SUBSET_TESTS)))"

.PHONY: install build test test-triton-versions test-slow test-wheel sanitize cuda-check gpu-check bench examples lint clean

# The seed papers' methods on scikit-learn's digits; each writes a PNG and a table to examples/out/.
EXAMPLES := examples.adaptive_pruning examples.layerwise_sls examples.spa_vs_finepruning examples.block_spa

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet --upgrade $(TEST_DEPS)
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
# The smoke subset: the configuration report, and the cpu backend against the float64
# oracle on the small linear and conv cases in float32 (about 250 tests).
WHEEL_SMOKE := tests/package/test_show_config.py \
	tests/backends/test_linear_backends.py::test_backend_small_cases tests/backends/test_conv_backends.py::test_splora_conv_backend \
	-k "test_show_config or (float32 and cpu)"
test-wheel: $(STAMP)
	tools/test_wheel.sh $(PY) $(WHEEL_VENV) -q $(WHEEL_SMOKE)

# The cpu backend's tests under AddressSanitizer and UndefinedBehaviorSanitizer,
# on a build of its own in build-sanitize/ (the in-place build is not touched).
SANITIZE_TESTS := tests/backends/test_linear_backends.py tests/backends/test_conv_backends.py tests/backends/test_compact_backends.py tests/functional/test_validation.py
sanitize: $(STAMP)
	tools/sanitize.sh $(PY) -q $(addprefix $(CURDIR)/,$(SANITIZE_TESTS)) -k "not triton"

# A venv per Triton release: torch from the local CPU build, then that Triton.
.venv-triton-%/.installed:
	test -x .venv-triton-$*/bin/python || $(PYTHON) -m venv .venv-triton-$*
	.venv-triton-$*/bin/python -m pip install --quiet torch==2.13.0
	.venv-triton-$*/bin/python -m pip install --quiet "triton==$*.*" numpy pytest pytest-timeout hypothesis
	touch $@

test-triton-versions: build $(TRITON_VERSIONS:%=.venv-triton-%/.installed)
	for version in $(TRITON_VERSIONS); do \
		.venv-triton-$$version/bin/python -c "import numpy, torch, triton; print('triton', triton.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)" && \
		.venv-triton-$$version/bin/python -m pytest -q -p no:cacheprovider $(TRITON_SUBSET) $(TRITON_TESTS) || exit 1; \
	done

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
	rm -rf build spa_kernels/*.so $(VENV) .venv-triton-*
	rm -rf build-sanitize build-wheel $(WHEEL_VENV)
