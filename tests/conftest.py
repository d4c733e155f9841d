"""Shared test set-up: fixed seeds, the Triton interpreter on CPU-only machines."""

import os

import torch

# Triton decides at import time whether kernels run in its interpreter, so the
# switch must be set before spa_kernels (and Triton) are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import spa_kernels  # noqa: E402
from spa_kernels.backend import cpu as cpu_backend  # noqa: E402

# Runs against an installed wheel or a separately built copy (make test-wheel,
# make sanitize) name the directory the package must come from, so that a
# silent fall-back to the source tree, or to a package without its compiled
# kernels, cannot pass for them.
_EXPECTED_PACKAGE_DIR = os.environ.get("SPA_KERNELS_EXPECT_PACKAGE_DIR")
if _EXPECTED_PACKAGE_DIR:
    _expected = os.path.realpath(_EXPECTED_PACKAGE_DIR)
    _loaded = os.path.realpath(os.path.dirname(spa_kernels.__file__))
    if _loaded != _expected:
        raise pytest.UsageError(f"spa_kernels was imported from {_loaded}, expected {_expected}")
    if not cpu_backend.BUILT:
        raise pytest.UsageError(f"the cpu extension of {_loaded} does not import: {cpu_backend.BUILD_ERROR}")
    if not os.path.realpath(cpu_backend.extension_path()).startswith(_expected + os.sep):
        raise pytest.UsageError(f"spa_kernels._C was loaded from {cpu_backend.extension_path()}")


def pytest_report_header(config):
    return [
        f"spa_kernels: {os.path.dirname(spa_kernels.__file__)}",
        f"cpu extension: {cpu_backend.extension_path() or 'not built: ' + str(cpu_backend.BUILD_ERROR)}",
    ]


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield
