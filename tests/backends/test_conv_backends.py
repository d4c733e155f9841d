"""Every non-reference backend's convolutions against the reference, forward and every gradient.

Backends are found at collection time: those of ``spa_kernels.backends("cpu")``
that implement ``splora_conv`` / ``sppara_conv`` (``<op>_forward`` and
``<op>_backward``); the ``cpu`` backend runs once per instruction set it
supports.  With none, the tests skip with the reason.  The truth is the
reference backend run in float64 on the same (rounded) inputs; the reference is
held to an independent dense computation by test_conv_reference.py.  Float32
must be within 1e-4 of it, float64 within 1e-10, bfloat16/float16 at most twice
PyTorch's own error in that dtype.  Each run also checks that the op layer
really dispatched to the backend under test.

The Triton interpreter is slow: it gets a representative subset of the small
cases, low precision on fewer still, and fewer random examples.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.conv_cases import (
    SPLORA_SPECS,
    SPPARA_SPECS,
    assert_pruned_exact_zero,
    build_case,
    conv_backend_params,
    conv_specs,
    poison_pruned,
    reference_truth,
    run_api,
    torch_low_precision,
)
from support.linear_cases import ALL_DTYPES, LOW_PRECISION, check_results, forced_isa, skip_unless_available

import spa_kernels

SPECS = {**SPLORA_SPECS, **SPPARA_SPECS}
SPLORA_BACKENDS = conv_backend_params("splora_conv")
SPPARA_BACKENDS = conv_backend_params("sppara_conv")

# About 2-3 s each in the interpreter: tiny 3-D shapes, one case per kind of geometry.
TRITON_SPECS = {
    "2d-basic", "1d-basic", "3d-tiny", "2d-stride2", "1d-stride2-dilation2", "2d-1x1", "2d-asymmetric",
    "all-pruned", "one-channel", "no-adapter", "noncontiguous", "weight-grad", "empty-batch",
    "sppara-2d-basic", "sppara-3d-tiny", "sppara-weight-grad", "sppara-all-pruned",
}
TRITON_LOW_PRECISION_SPECS = {"2d-basic", "sppara-2d-basic"}
TRITON_POISONED_SPECS = {"2d-basic", "sppara-2d-basic"}


@pytest.fixture(params=SPLORA_BACKENDS)
def splora_backend(request):
    """Name of a backend implementing splora_conv, with the cpu backend's ISA forced for the test."""
    name, isa = request.param
    with forced_isa(isa):
        yield name


@pytest.fixture(params=SPPARA_BACKENDS)
def sppara_backend(request):
    name, isa = request.param
    with forced_isa(isa):
        yield name


@functools.cache
def _named_case(spec_name: str, dtype: torch.dtype):
    """Named cases are deterministic: build them and their truth once for all backends and ISAs."""
    case = build_case(SPECS[spec_name])
    yardstick = torch_low_precision(case, dtype) if dtype in LOW_PRECISION else None
    return case, reference_truth(case, dtype), yardstick


def _check(backend: str, case, dtype: torch.dtype, label: str, expected, yardstick) -> None:
    result = run_api(case, dtype, backend)
    check_results(f"{backend}[{label}]", result, expected, dtype, yardstick)
    assert_pruned_exact_zero(f"{backend}[{label}]", result, case)


def _check_named(backend: str, spec_name: str, dtype: torch.dtype) -> None:
    if backend == "triton":
        if spec_name not in TRITON_SPECS:
            pytest.skip("Triton interpreter time budget: a representative subset of the cases")
        if dtype in LOW_PRECISION and spec_name not in TRITON_LOW_PRECISION_SPECS:
            pytest.skip("Triton interpreter time budget: low precision on a few cases")
    skip_unless_available(backend, dtype)
    case, expected, yardstick = _named_case(spec_name, dtype)
    _check(backend, case, dtype, spec_name, expected, yardstick)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("spec_name", list(SPLORA_SPECS))
def test_splora_conv_backend(splora_backend, spec_name, dtype):
    _check_named(splora_backend, spec_name, dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("spec_name", list(SPPARA_SPECS))
def test_sppara_conv_backend(sppara_backend, spec_name, dtype):
    _check_named(sppara_backend, spec_name, dtype)


def _check_poisoned(backend: str, spec_name: str) -> None:
    """NaN in every pruned entry (inputs and grad_out) must not reach any result."""
    if backend == "triton" and spec_name not in TRITON_POISONED_SPECS:
        pytest.skip("Triton interpreter time budget: poisoned inputs on a few cases")
    skip_unless_available(backend, torch.float32)
    clean = build_case(SPECS[spec_name])
    result = run_api(poison_pruned(clean), torch.float32, backend)
    check_results(f"{backend}-poisoned[{spec_name}]", result, reference_truth(clean, torch.float32), torch.float32)
    assert_pruned_exact_zero(f"{backend}-poisoned[{spec_name}]", result, clean)


@pytest.mark.parametrize("spec_name", ["2d-basic", "weight-grad", "3d-stride2-dilation2", "one-channel",
                                       "2d-padding-beyond-centre"])
def test_splora_conv_never_reads_pruned_entries(splora_backend, spec_name):
    _check_poisoned(splora_backend, spec_name)


@pytest.mark.parametrize("spec_name", ["sppara-2d-basic", "sppara-weight-grad"])
def test_sppara_conv_never_reads_pruned_entries(sppara_backend, spec_name):
    _check_poisoned(sppara_backend, spec_name)


def _random_case_check(backend_param, kind: str, data, *, max_channels: int, max_spatial: int,
                       max_spatial_3d: int = 6) -> None:
    name, isa = backend_param
    spec = data.draw(conv_specs(kind=kind, max_channels=max_channels, max_spatial=max_spatial,
                                max_spatial_3d=max_spatial_3d), label="spec")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    skip_unless_available(name, torch.float32)
    case = build_case(spec, seed)
    with forced_isa(isa):
        _check(name, case, torch.float32, "random", reference_truth(case, torch.float32), None)


def _native(params):
    return [p for p in params if p.id != "triton"]


def _triton(params):
    return [p for p in params if p.id == "triton"] or [
        pytest.param(None, marks=pytest.mark.skip(reason="the triton backend does not run this op on CPU"))
    ]


@pytest.mark.parametrize("backend_param", _native(SPLORA_BACKENDS))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_splora_conv_random_cases(backend_param, data):
    _random_case_check(backend_param, "splora", data, max_channels=24, max_spatial=12)


@pytest.mark.parametrize("backend_param", _native(SPPARA_BACKENDS))
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_sppara_conv_random_cases(backend_param, data):
    _random_case_check(backend_param, "sppara", data, max_channels=24, max_spatial=12)


@pytest.mark.parametrize("backend_param", _triton(SPLORA_BACKENDS))
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_triton_splora_conv_random_cases(backend_param, data):
    _random_case_check(backend_param, "splora", data, max_channels=6, max_spatial=5, max_spatial_3d=3)


@pytest.mark.parametrize("backend_param", _triton(SPPARA_BACKENDS))
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_triton_sppara_conv_random_cases(backend_param, data):
    _random_case_check(backend_param, "sppara", data, max_channels=6, max_spatial=5, max_spatial_3d=3)


def test_splora_conv_op_refuses_groups(splora_backend):
    """Called directly with groups != 1, the op refuses a fused backend instead of computing garbage."""
    x, weight = torch.randn(1, 4, 5, 5), torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError, match="groups"):
        torch.ops.spa_kernels.splora_conv(x, weight, None, None, None, None, None, [1, 1], [1, 1], [1, 1], 2,
                                          1.0, splora_backend)


def test_sppara_conv_op_refuses_groups(sppara_backend):
    x, weight, adapter = torch.randn(1, 4, 5, 5), torch.randn(4, 2, 3, 3), torch.randn(4, 2)
    with pytest.raises(ValueError, match="groups"):
        torch.ops.spa_kernels.sppara_conv(x, weight, adapter, None, None, None, [1, 1], [1, 1], [1, 1], 2,
                                          sppara_backend)


def test_splora_conv_stride_zero_inputs(splora_backend):
    """Broadcast (stride-0) x, adapters, bias and grad_out give the same answer as copies."""
    skip_unless_available(splora_backend, torch.float32)
    x = torch.randn(1, 1, 1, 1).expand(2, 5, 6, 6)
    weight = torch.randn(4, 5, 3, 3)
    lora_a, lora_b = torch.randn(2, 1).expand(2, 5), torch.randn(4, 1).expand(4, 2)
    bias = torch.randn(1).expand(4)
    in_idx, out_idx = torch.tensor([0, 2, 3]), torch.tensor([1, 3])
    results = {}
    for label, run_on in (("expanded", splora_backend), ("copies", "reference")):
        leaves = [t.clone().requires_grad_() if label == "copies" else t.detach().requires_grad_()
                  for t in (x, lora_a, lora_b, bias)]
        y = spa_kernels.splora_conv2d(leaves[0], weight, leaves[1], leaves[2], leaves[3], in_idx, out_idx,
                                      padding=1, stride=2, scale=0.5, backend=run_on)
        grads = torch.autograd.grad(y, leaves, grad_outputs=torch.ones(1, 1, 1, 1).expand_as(y))
        results[label] = {"y": y.detach(), **dict(zip(("x", "lora_a", "lora_b", "bias"), grads, strict=True))}
    expected = {k: v.double() for k, v in results["copies"].items()}
    check_results(f"{splora_backend}[stride-0]", results["expanded"], expected, torch.float32)


@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_conv_thread_counts(splora_backend, threads):
    """Work split over 1 thread and over more threads than there are cores here."""
    if splora_backend != "cpu":
        pytest.skip("thread count applies to the cpu backend (torch.get_num_threads)")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_named(splora_backend, "weight-grad-3d-stride2", torch.float32)
        _check_named(splora_backend, "2d-5x5-stride2", torch.bfloat16)
    finally:
        torch.set_num_threads(previous)
