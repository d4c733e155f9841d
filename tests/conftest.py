"""Shared test set-up: fixed seeds, the Triton interpreter on CPU-only machines."""

import os

import torch

# Triton decides at import time whether kernels run in its interpreter, so the
# switch must be set before spa_kernels (and Triton) are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield
