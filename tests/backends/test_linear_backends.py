"""Every non-reference backend against float64 truth, forward and every gradient.

Backends are found at collection time (``spa_kernels.backends("cpu")``); the
``cpu`` backend runs once per instruction set it supports.  With nothing built
the tests skip with the reason.  Float32 must be within 1e-4 of the float64
result, float64 within 1e-10; bfloat16/float16 at most twice PyTorch's own
error in that dtype.  Each run also checks that the op layer really dispatched
to the backend under test, so a silent fall-back cannot pass.

The Triton backend runs in its interpreter on CPU, which is slow: it gets the
small cases (≤ 48 channels, ≤ 40 rows) only, and fewer random examples.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.linear_cases import (
    ALL_DTYPES,
    BIG_SPECS,
    LOW_PRECISION,
    SMALL_SPECS,
    assert_pruned_exact_zero,
    build_case,
    check_results,
    dense_oracle,
    forced_isa,
    linear_specs,
    non_reference_backend_params,
    poison_pruned,
    run_api,
    skip_unless_available,
    torch_low_precision,
)

import spa_kernels

SPECS = {**SMALL_SPECS, **BIG_SPECS}
BACKENDS = non_reference_backend_params(with_small_problems=True)
# The interpreter is slow: low precision on a representative subset only.
TRITON_LOW_PRECISION_SPECS = {
    "basic", "nd-x", "rank-above-in", "keep-0.1", "all-pruned", "one-channel", "plain-linear",
    "noncontiguous", "weight-grad", "adapter-grads-only", "expanded-grad-out", "square-48",
}
# Low precision on blocked shapes costs seconds per case: a subset that still
# covers every block tail, the weight gradient and strided inputs.
BIG_LOW_PRECISION_SPECS = (
    "big-plain-masked", "big-keep0.5-weight-grad", "big-primes-noncontiguous", "big-wide-out-adapter-grads",
)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Name of the backend under test, with the cpu backend's ISA forced for the test."""
    name, isa = request.param
    with forced_isa(isa):
        yield name


def _truth(case, dtype: torch.dtype):
    """Float64 oracle and, in low precision, PyTorch's own result (the error yardstick)."""
    expected = dense_oracle(case, rounded_to=dtype)
    yardstick = torch_low_precision(case, dtype) if dtype in LOW_PRECISION else None
    return expected, yardstick


@functools.cache
def _named_case(spec_name: str, dtype: torch.dtype):
    """Named cases are deterministic: build them and their truth once for all backends/ISAs."""
    case = build_case(SPECS[spec_name])
    return (case, *_truth(case, dtype))


def _check(backend: str, case, dtype: torch.dtype, label: str, expected, yardstick) -> None:
    result = run_api(case, dtype, backend)
    check_results(f"{backend}[{label}]", result, expected, dtype, yardstick)
    assert_pruned_exact_zero(f"{backend}[{label}]", result, case)


def _check_named(backend: str, spec_name: str, dtype: torch.dtype) -> None:
    skip_unless_available(backend, dtype)
    case, expected, yardstick = _named_case(spec_name, dtype)
    _check(backend, case, dtype, spec_name, expected, yardstick)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("spec_name", list(SMALL_SPECS))
def test_backend_small_cases(backend, spec_name, dtype):
    if backend == "triton" and dtype in LOW_PRECISION and spec_name not in TRITON_LOW_PRECISION_SPECS:
        pytest.skip("Triton interpreter time budget: low precision runs on a representative subset")
    _check_named(backend, spec_name, dtype)


BLOCKED_CASES = [
    *[(name, dtype) for name in BIG_SPECS for dtype in (torch.float32, torch.float64)],
    *[(name, dtype) for name in BIG_LOW_PRECISION_SPECS for dtype in LOW_PRECISION],
]


@pytest.mark.parametrize(("spec_name", "dtype"), BLOCKED_CASES, ids=lambda v: str(v))
def test_backend_blocked_shapes(backend, spec_name, dtype):
    """Several M/K/N blocks, prime sizes, ragged tails: native backends only."""
    if backend == "triton":
        pytest.skip("too large for the Triton interpreter on CPU")
    _check_named(backend, spec_name, dtype)


@pytest.mark.parametrize("spec_name", ["basic", "weight-grad", "nd-x", "keep-0.1", "one-channel", "noncontiguous"])
def test_backend_never_reads_pruned_entries(backend, spec_name):
    """NaN in every pruned entry (inputs and grad_out) must not reach any result.

    ``y`` sums over the active channels only; a kernel that multiplies the
    full width by a mask, or gathers with a wrong index, turns this into NaN.
    """
    skip_unless_available(backend, torch.float32)
    clean = build_case(SMALL_SPECS[spec_name])
    result = run_api(poison_pruned(clean), torch.float32, backend)
    check_results(f"{backend}-poisoned[{spec_name}]", result, dense_oracle(clean, torch.float32), torch.float32)
    assert_pruned_exact_zero(f"{backend}-poisoned[{spec_name}]", result, clean)


def test_backend_blocked_never_reads_pruned_entries(backend):
    if backend == "triton":
        pytest.skip("too large for the Triton interpreter on CPU")
    clean = build_case(BIG_SPECS["big-keep0.5-weight-grad"])
    result = run_api(poison_pruned(clean), torch.float32, backend)
    check_results(f"{backend}-poisoned[big]", result, dense_oracle(clean, torch.float32), torch.float32)
    assert_pruned_exact_zero(f"{backend}-poisoned[big]", result, clean)


def _random_case_check(backend_param, data, *, max_features: int, max_rows: int) -> None:
    name, isa = backend_param
    spec = data.draw(linear_specs(max_features=max_features, max_rows=max_rows), label="spec")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    skip_unless_available(name, torch.float32)
    case = build_case(spec, seed)
    with forced_isa(isa):
        _check(name, case, torch.float32, "random", *_truth(case, torch.float32))


@pytest.mark.parametrize("backend_param", [p for p in BACKENDS if p.id != "triton"])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_backend_random_cases(backend_param, data):
    _random_case_check(backend_param, data, max_features=160, max_rows=96)


@pytest.mark.parametrize("backend_param", [p for p in BACKENDS if p.id == "triton"] or [
    pytest.param(None, marks=pytest.mark.skip(reason="the triton backend is not available on CPU"))
])
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_triton_random_cases(backend_param, data):
    _random_case_check(backend_param, data, max_features=48, max_rows=40)


@pytest.mark.skipif(not spa_kernels.backend.cpu.BUILT, reason="the cpu backend is not built (`make build`)")
def test_cpu_isa_api():
    """The ISA switch the parametrisation relies on: listed, settable, restorable."""
    isas = spa_kernels.backend.cpu.supported_isas()
    print(f"supported ISAs: {isas}, current: {spa_kernels.backend.cpu.isa()}")
    assert isas, "supported_isas() is empty"
    assert "generic" in isas, f"the portable path must always be available, got {isas}"
    assert set(isas) <= {"avx512", "avx2", "generic"}, isas
    assert spa_kernels.backend.cpu.isa() in isas
    previous = spa_kernels.backend.cpu.isa()
    try:
        for isa in isas:
            spa_kernels.backend.cpu.set_isa(isa)
            assert spa_kernels.backend.cpu.isa() == isa
        with pytest.raises((ValueError, RuntimeError)):
            spa_kernels.backend.cpu.set_isa("not-an-isa")
        for isa in {"avx512", "avx2"} - set(isas):  # not supported by this CPU: refused
            with pytest.raises((ValueError, RuntimeError)):
                spa_kernels.backend.cpu.set_isa(isa)
    finally:
        spa_kernels.backend.cpu.set_isa(previous)
    assert spa_kernels.backend.cpu.isa() == previous


def test_backend_stride_zero_inputs(backend):
    """Broadcast (stride-0) x, weight, adapters and grad_out give the same answer as copies."""
    skip_unless_available(backend, torch.float32)
    x = torch.randn(1, 11).expand(6, 11)
    weight = torch.randn(1, 11).expand(9, 11)
    lora_a, lora_b = torch.randn(3, 1).expand(3, 11), torch.randn(9, 1).expand(9, 3)
    bias = torch.randn(1).expand(9)
    in_idx, out_idx = torch.tensor([0, 4, 5, 10]), torch.tensor([2, 3, 8])
    results = {}
    for name, run_on in (("expanded", backend), ("copies", "reference")):
        leaves = [t.clone().requires_grad_() if name == "copies" else t.detach().requires_grad_()
                  for t in (x, lora_a, lora_b, bias)]
        y = spa_kernels.splora_linear(leaves[0], weight if name == "expanded" else weight.contiguous(),
                                      leaves[1], leaves[2], leaves[3], in_idx, out_idx, scale=0.5, backend=run_on)
        grads = torch.autograd.grad(y, leaves, grad_outputs=torch.ones(1, 1).expand_as(y))
        results[name] = {"y": y.detach(), **dict(zip(("x", "lora_a", "lora_b", "bias"), grads, strict=True))}
    expected = {k: v.double() for k, v in results["copies"].items()}
    check_results(f"{backend}[stride-0]", results["expanded"], expected, torch.float32)


@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_backend_thread_counts(backend, threads):
    """Work split over 1 thread and over an odd number of threads (more than the cores here)."""
    if backend != "cpu":
        pytest.skip("thread count applies to the cpu backend (torch.get_num_threads)")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_named(backend, "big-keep0.5-weight-grad", torch.float32)
        _check_named(backend, "big-primes-noncontiguous", torch.bfloat16)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.skipif(not spa_kernels.backend.cpu.BUILT, reason="the cpu backend is not built")
def test_small_problem_limit_is_settable_and_checked():
    cpu = spa_kernels.backend.cpu
    previous = cpu.small_problem_limit()
    assert previous > 0, "the small-problem loops must be on by default"
    try:
        cpu.set_small_problem_limit(0)
        assert cpu.small_problem_limit() == 0
        with pytest.raises(ValueError, match="small-problem limit"):
            cpu.set_small_problem_limit(-1)
        assert cpu.small_problem_limit() == 0
    finally:
        cpu.set_small_problem_limit(previous)
