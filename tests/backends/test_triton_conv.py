"""The triton backend of the SPLoRA / SPPaRA convolutions, forward and every gradient.

The oracle is a dense float64 computation written here and independent of
spa_kernels: the masked effective weight (``W`` plus ``s·B A`` or ``P`` at the
centre tap, every entry with a pruned output or input channel zeroed) through
``torch.nn.functional.conv{d}d``, differentiated by autograd.  Where the
reference backend has the convolutions, it is checked against the same oracle
and the triton results against it as well.

On a machine without a GPU the kernels run in Triton's interpreter
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports
Triton), which costs milliseconds per kernel operation, so cases are tiny: batch
at most 2, at most 10 channels (two 8-wide interpreter blocks with a ragged
tail), spatial sizes at most 7, and few 3-D or 5×5 cases.  Tests on CUDA tensors
use bigger shapes and skip themselves without a GPU.

Tolerances (docs/design.md section 6), each against the float64 result of the same
rounded inputs: float32 within 1e-4 of the largest value; bfloat16 and float16
at most twice the error of PyTorch's own computation in that dtype (the dense
formula run in it), plus one ulp of the largest value.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from support.triton_support import (
    compile_for_gpu,
    has_nvidia_compiler,
    max_error,
    random_indices,
    run_without_interpreter,
)
from torch import Tensor

import spa_kernels
from spa_kernels.backend import triton as triton_backend

pytestmark = pytest.mark.skipif(not triton_backend.IMPORTED, reason="Triton is not installed")

CPU_RUNS = triton_backend.is_available("cpu", None)
CUDA_RUNS = torch.cuda.is_available() and triton_backend.is_available("cuda", None)
needs_interpreter = pytest.mark.skipif(not CPU_RUNS, reason="needs TRITON_INTERPRET=1 set before Triton's import")
needs_cuda = pytest.mark.skipif(not CUDA_RUNS, reason="needs a CUDA GPU")

# The public functions and the reference convolutions, where this checkout has them.
PUBLIC_API = all(hasattr(spa_kernels, f"{kind}_conv{d}d") for kind in ("splora", "sppara") for d in (1, 2, 3))
REFERENCE = hasattr(spa_kernels.backend.reference, "splora_conv_forward") and hasattr(
    spa_kernels.backend.reference, "sppara_conv_forward"
)

SPLORA_NAMES = ("x", "weight", "lora_a", "lora_b", "bias")
SPPARA_NAMES = ("x", "weight", "adapter", "bias")
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# --------------------------------------------------------------------------- cases


def _per_dim(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple) else (value,) * dims


@dataclasses.dataclass(frozen=True)
class Spec:
    """A case.  ``keep_*`` is None (index None), a fraction, or an int count of active channels;
    ``padding="same"`` is ``dilation·(kernel − 1) / 2`` per dim; ``rank=None`` is no adapter
    (SPLoRA only); per-dim fields take an int or a tuple."""

    dims: int = 2
    batch: int = 2
    in_channels: int = 6
    out_channels: int = 7
    size: int | tuple[int, ...] = 5
    kernel: int | tuple[int, ...] = 3
    stride: int | tuple[int, ...] = 1
    padding: int | tuple[int, ...] | str = "same"
    dilation: int | tuple[int, ...] = 1
    rank: int | None = 2
    sppara: bool = False
    keep_in: float | int | None = 0.5
    keep_out: float | int | None = 0.5
    bias: bool = True
    scale: float = 0.5
    weight_grad: bool = False
    noncontiguous_x: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return SPPARA_NAMES if self.sppara else SPLORA_NAMES

    def geometry(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        kernel, dilation = _per_dim(self.kernel, self.dims), _per_dim(self.dilation, self.dims)
        if self.padding == "same":
            padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
        else:
            padding = _per_dim(self.padding, self.dims)
        return _per_dim(self.stride, self.dims), padding, dilation




@dataclasses.dataclass
class Case:
    spec: Spec
    tensors: dict[str, Tensor | None]  # masters in the run's dtype
    grad_out: Tensor
    in_idx: Tensor | None
    out_idx: Tensor | None


def output_size(spec: Spec) -> tuple[int, ...]:
    stride, padding, dilation = spec.geometry()
    sizes, kernel = _per_dim(spec.size, spec.dims), _per_dim(spec.kernel, spec.dims)
    return tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(sizes, kernel, stride, padding, dilation, strict=True)
    )


def make_case(spec: Spec, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> Case:
    """Random inputs rounded to ``dtype``; the adapter term is about as large as the base term."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype).to(device)

    kernel = _per_dim(spec.kernel, spec.dims)
    taps = 1
    for k in kernel:
        taps *= k
    n_in, n_out, rank = spec.in_channels, spec.out_channels, spec.rank
    fan_in = (n_in * taps) ** -0.5
    adapter_std = (n_in * taps) ** -0.5 * taps**0.5
    tensors = {
        "x": randn(spec.batch, n_in, *_per_dim(spec.size, spec.dims)),
        "weight": randn(n_out, n_in, *kernel, std=fan_in),
        "lora_a": randn(rank, n_in, std=adapter_std) if rank and not spec.sppara else None,
        "lora_b": randn(n_out, rank, std=rank**-0.5) if rank and not spec.sppara else None,
        "adapter": randn(n_out, n_in, std=adapter_std) if spec.sppara else None,
        "bias": randn(n_out) if spec.bias else None,
    }
    in_idx = random_indices(spec.keep_in, n_in, gen)
    out_idx = random_indices(spec.keep_out, n_out, gen)
    grad_out = randn(spec.batch, n_out, *output_size(spec))
    return Case(
        spec, tensors, grad_out,
        None if in_idx is None else in_idx.to(device),
        None if out_idx is None else out_idx.to(device),
    )


def _mask(idx: Tensor | None, size: int, device) -> Tensor:
    mask = torch.ones(size, dtype=torch.bool, device=device)
    if idx is not None:
        mask[:] = False
        mask[idx] = True
    return mask


# --------------------------------------------------------------------------- runs


def _leaves(case: Case, dtype: torch.dtype) -> dict[str, Tensor | None]:
    leaves = {}
    for name, master in case.tensors.items():
        wanted = name != "weight" or case.spec.weight_grad
        leaves[name] = None if master is None else master.to(dtype).detach().requires_grad_(wanted)
    return leaves


def _collect(y: Tensor, leaves: dict[str, Tensor | None], case: Case, dtype: torch.dtype) -> dict[str, Tensor]:
    assert y.dtype == dtype and y.shape == case.grad_out.shape, (y.dtype, tuple(y.shape))
    y.backward(case.grad_out.to(dtype))
    result = {"y": y.detach()}
    for name, leaf in leaves.items():
        if leaf is not None and leaf.requires_grad:
            result[name] = leaf.grad
    return result


def run_dense(case: Case, dtype: torch.dtype) -> dict[str, Tensor]:
    """The oracle: dense masked effective weight through F.conv, differentiated by autograd."""
    spec = case.spec
    leaves = _leaves(case, dtype)
    weight = leaves["weight"]
    device = weight.device
    active = _mask(case.out_idx, spec.out_channels, device)[:, None] & _mask(case.in_idx, spec.in_channels, device)
    centre = (slice(None), slice(None), *(k // 2 for k in weight.shape[2:]))
    adapter_term = torch.zeros_like(weight)
    if spec.sppara:
        adapter_term[centre] = leaves["adapter"]
    elif leaves["lora_a"] is not None:
        adapter_term[centre] = spec.scale * (leaves["lora_b"] @ leaves["lora_a"])
    effective = (weight + adapter_term) * active.reshape(*active.shape, *(1,) * spec.dims).to(dtype)
    bias = leaves["bias"] * _mask(case.out_idx, spec.out_channels, device).to(dtype) if spec.bias else None
    stride, padding, dilation = spec.geometry()
    y = _CONV[spec.dims](leaves["x"], effective, bias, stride, padding, dilation)
    return _collect(y, leaves, case, dtype)


def _public_call(case: Case, leaves: dict[str, Tensor | None], x: Tensor, backend: str) -> Tensor:
    spec = case.spec
    stride, padding, dilation = spec.geometry()
    geometry = {"stride": stride, "padding": padding, "dilation": dilation, "backend": backend}
    if spec.sppara:
        function = getattr(spa_kernels, f"sppara_conv{spec.dims}d")
        return function(x, leaves["weight"], leaves["adapter"], leaves["bias"], case.in_idx, case.out_idx,
                        **geometry)
    function = getattr(spa_kernels, f"splora_conv{spec.dims}d")
    return function(x, leaves["weight"], leaves["lora_a"], leaves["lora_b"], leaves["bias"], case.in_idx,
                    case.out_idx, scale=spec.scale, **geometry)


def run_public(case: Case, backend: str, dtype: torch.dtype) -> dict[str, Tensor]:
    """Forward and gradients through ``spa_kernels.splora_conv{d}d`` / ``sppara_conv{d}d`` and autograd."""
    leaves = _leaves(case, dtype)
    x = leaves["x"]
    if case.spec.noncontiguous_x:  # same values, channels-last memory
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
        assert not x.is_contiguous()
    result = _collect(_public_call(case, leaves, x, backend), leaves, case, dtype)
    if not case.spec.weight_grad:
        assert leaves["weight"].grad is None
    return result


def run_backend(case: Case, backend, dtype: torch.dtype) -> dict[str, Tensor]:
    """Forward and gradients from a backend's four entry points, without autograd."""
    spec = case.spec
    stride, padding, dilation = spec.geometry()
    t = {name: None if v is None else v.to(dtype) for name, v in case.tensors.items()}
    x, weight, bias, in_idx, out_idx = t["x"], t["weight"], t["bias"], case.in_idx, case.out_idx
    if spec.noncontiguous_x:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    grad_out = case.grad_out.to(dtype)
    if spec.sppara:
        wanted = (True, spec.weight_grad, True, spec.bias)
        y = backend.sppara_conv_forward(x, weight, t["adapter"], bias, in_idx, out_idx, stride, padding, dilation, 1)
        grads = backend.sppara_conv_backward(grad_out, x, weight, t["adapter"], in_idx, out_idx, stride, padding,
                                             dilation, 1, wanted)
    else:
        a, b = t["lora_a"], t["lora_b"]
        wanted = (True, spec.weight_grad, a is not None, a is not None, spec.bias)
        y = backend.splora_conv_forward(x, weight, a, b, bias, in_idx, out_idx, spec.scale, stride, padding,
                                        dilation, 1)
        grads = backend.splora_conv_backward(grad_out, x, weight, a, b, in_idx, out_idx, spec.scale, stride,
                                             padding, dilation, 1, wanted)
    result = {"y": y}
    for name, want, grad in zip(spec.names, wanted, grads, strict=True):
        if want:
            assert grad is not None, f"{name} gradient missing"
            result[name] = grad
        else:
            assert grad is None, f"{name} gradient computed although not asked for"
    return result


def run_triton(case: Case, dtype: torch.dtype) -> dict[str, Tensor]:
    if PUBLIC_API:
        return run_public(case, "triton", dtype)
    return run_backend(case, triton_backend, dtype)


# --------------------------------------------------------------------------- comparison




def _compare(got: dict[str, Tensor], exact: dict[str, Tensor], yardstick: dict[str, Tensor] | None,
             dtype: torch.dtype, label: str) -> list[str]:
    assert got.keys() == exact.keys(), (sorted(got), sorted(exact))
    failures = []
    for key, expected in exact.items():
        largest = float(expected.abs().max()) if expected.numel() else 0.0
        if yardstick is None:
            tolerance = 1e-4 * largest
        else:
            torch_error, _ = max_error(yardstick[key], expected)
            tolerance = 2 * torch_error + torch.finfo(dtype).eps * largest
        error, report = max_error(got[key], expected)
        print(f"{dtype} {key} vs {label}: {report}; tolerance {tolerance:.3e}")
        if not error <= tolerance:
            failures.append(f"{key} vs {label}: {report} exceeds {tolerance:.3e}")
    return failures


def _pruned_entries_not_zero(case: Case, result: dict[str, Tensor]) -> list[str]:
    spec = case.spec
    device = case.grad_out.device
    in_pruned = ~_mask(case.in_idx, spec.in_channels, device)
    out_pruned = ~_mask(case.out_idx, spec.out_channels, device)
    where = {
        "y": (slice(None), out_pruned),
        "x": (slice(None), in_pruned),
        "lora_a": (slice(None), in_pruned),
        "lora_b": (out_pruned,),
        "adapter": (out_pruned[:, None] | in_pruned[None, :],),
        "bias": (out_pruned,),
        "weight": (out_pruned[:, None] | in_pruned[None, :],),
    }
    return [
        f"{key} is non-zero at {int((result[key][at] != 0).sum())} pruned entries"
        for key, at in where.items()
        if key in result and bool((result[key][at] != 0).any())
    ]


def check(case: Case, dtype: torch.dtype) -> None:
    """Triton in ``dtype`` against float64 (the dense oracle, and the reference where it exists)."""
    got = run_triton(case, dtype)
    exact = run_dense(case, torch.float64)
    yardstick = run_dense(case, dtype) if dtype != torch.float32 else None
    failures = _compare(got, exact, yardstick, dtype, "dense float64")
    if REFERENCE:
        reference = (run_public(case, "reference", torch.float64) if PUBLIC_API
                     else run_backend(case, spa_kernels.backend.reference, torch.float64))
        for key, expected in exact.items():  # the oracle chain: reference == dense in float64
            error, report = max_error(reference[key], expected)
            largest = float(expected.abs().max()) if expected.numel() else 0.0
            if not error <= 1e-10 * max(largest, 1.0):
                failures.append(f"reference {key} vs dense float64: {report}")
        failures += _compare(got, reference, yardstick, dtype, "reference float64")
    failures += _pruned_entries_not_zero(case, got)
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------- interpreter (CPU)

# Shapes that break kernels: every geometry option alone, sizes that are not
# multiples of any block, batch 1, rank 1 and a rank above one rank block,
# keep 1.0/0.5/0.1, everything pruned, one channel.
SMALL = {
    "2d-3x3-same": Spec(),
    "2d-3x3-pad0-weight-grad": Spec(padding=0, weight_grad=True),
    "2d-stride2-weight-grad": Spec(size=6, stride=2, padding=1, weight_grad=True),
    "2d-dilation2-same": Spec(size=6, dilation=2),
    "2d-stride2-dilation2-pad0": Spec(size=7, stride=2, dilation=2, padding=0, weight_grad=True),
    "2d-padding-beyond-centre": Spec(size=4, stride=2, padding=3),
    "2d-stride-exceeds-input": Spec(size=3, stride=4, padding=1, weight_grad=True),
    "2d-1x1-stride2": Spec(size=5, kernel=1, stride=2, padding=0, weight_grad=True),
    "2d-5x5-batch1": Spec(batch=1, in_channels=4, out_channels=5, size=5, kernel=5, weight_grad=True),
    "2d-per-dim-geometry": Spec(size=(5, 6), kernel=(3, 1), stride=(1, 2), dilation=(2, 1), padding=(1, 0),
                                weight_grad=True),
    "1d-same": Spec(dims=1, size=7),
    "1d-stride3-dilation2": Spec(dims=1, size=7, kernel=5, stride=3, dilation=2, padding=1),
    "1d-stride4-dilation6-weight-grad": Spec(dims=1, size=7, stride=4, dilation=2, padding=3, weight_grad=True),
    "1d-k5-stride2-pad0-weight-grad": Spec(dims=1, size=7, kernel=5, stride=2, padding=0, weight_grad=True),
    "3d-3x3x3-batch1": Spec(dims=3, batch=1, in_channels=3, out_channels=4, size=3, weight_grad=True),
    "3d-per-dim-stride2": Spec(dims=3, batch=1, in_channels=4, out_channels=3, size=(3, 4, 5), kernel=(1, 3, 3),
                               stride=(1, 2, 2), padding=(0, 1, 0)),
    "channels10-keep1.0": Spec(batch=1, in_channels=10, out_channels=10, keep_in=1.0, keep_out=1.0),
    "channels10-no-indices-weight-grad": Spec(batch=1, in_channels=10, out_channels=9, keep_in=None, keep_out=None,
                                              weight_grad=True),
    "keep0.1": Spec(in_channels=10, out_channels=10, keep_in=0.1, keep_out=0.1),
    "one-channel-rank1": Spec(keep_in=1, keep_out=1, rank=1, weight_grad=True),
    "all-ones": Spec(batch=1, in_channels=1, out_channels=1, size=1, kernel=1, padding=0, rank=1,
                     keep_in=None, keep_out=None),
    "rank17": Spec(rank=17, size=4),
    "all-pruned": Spec(keep_in=0.0, keep_out=0.0, weight_grad=True),
    "inputs-pruned": Spec(keep_in=0.0, weight_grad=True),
    "outputs-pruned": Spec(keep_out=0.0),
    "no-adapter-weight-grad": Spec(rank=None, stride=2, weight_grad=True),
    "no-adapter-no-bias": Spec(rank=None, bias=False),
    "no-bias-negative-scale": Spec(bias=False, scale=-2.5),
    "noncontiguous-x": Spec(noncontiguous_x=True),
    "sppara-same": Spec(sppara=True),
    "sppara-stride2-pad0-weight-grad": Spec(sppara=True, size=6, stride=2, padding=0, weight_grad=True),
    "sppara-padding-beyond-centre": Spec(sppara=True, size=4, stride=2, padding=3),
    "sppara-1d-dilation2": Spec(sppara=True, dims=1, size=7, dilation=2, keep_in=1.0, keep_out=None),
    "sppara-3d-batch1": Spec(sppara=True, dims=3, batch=1, in_channels=3, out_channels=4, size=3, stride=2),
    "sppara-5x5-no-bias": Spec(sppara=True, batch=1, in_channels=4, out_channels=5, kernel=5, bias=False),
    "sppara-all-pruned": Spec(sppara=True, keep_in=0.0, keep_out=0.0, weight_grad=True),
    "sppara-one-channel": Spec(sppara=True, in_channels=10, out_channels=10, keep_in=1, keep_out=1),
}

LOW_PRECISION_SMALL = ("2d-stride2-weight-grad", "1d-same", "rank17", "sppara-stride2-pad0-weight-grad")


@needs_interpreter
@pytest.mark.parametrize("name", list(SMALL))
def test_float32_matches_float64(name):
    check(make_case(SMALL[name], torch.float32), torch.float32)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", LOW_PRECISION_SMALL)
def test_low_precision_within_twice_torch_error(name, dtype):
    check(make_case(SMALL[name], dtype), dtype)


@needs_interpreter
@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    dims=st.sampled_from([1, 2]),
    size=st.integers(1, 6),
    kernel=st.sampled_from([1, 3]),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 3),
    channels=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    rank=st.one_of(st.none(), st.integers(1, 4)),
    sppara=st.booleans(),
    keep=st.tuples(st.one_of(st.none(), st.floats(0.0, 1.0)), st.one_of(st.none(), st.floats(0.0, 1.0))),
    weight_grad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_cases_match_float64(dims, size, kernel, stride, dilation, padding, channels, rank, sppara, keep,
                                    weight_grad, seed):
    size = max(size, dilation * (kernel - 1) + 1 - 2 * padding)  # at least one output position
    spec = Spec(dims=dims, batch=1 + seed % 2, in_channels=channels[0], out_channels=channels[1], size=size,
                kernel=kernel, stride=stride, dilation=dilation, padding=padding, rank=rank, sppara=sppara,
                keep_in=keep[0], keep_out=keep[1], weight_grad=weight_grad)
    check(make_case(spec, torch.float32, seed=seed), torch.float32)


@needs_interpreter
def test_int32_indices_are_accepted():
    case = make_case(Spec(), torch.float32)
    case.in_idx, case.out_idx = case.in_idx.int(), case.out_idx.int()
    check(case, torch.float32)


@needs_interpreter
@pytest.mark.parametrize("sppara", [False, True], ids=["splora", "sppara"])
@pytest.mark.parametrize("which", ["dx", "adapter-and-bias", "weight-and-bias", "all"])
def test_backward_returns_only_what_is_asked(which, sppara):
    """The backend entry point: None where not asked, the oracle's values where asked."""
    spec = Spec(sppara=sppara, stride=2, size=6, weight_grad=True)
    case = make_case(spec, torch.float32)
    names = spec.names
    asked = {
        "dx": {"x"},
        "adapter-and-bias": {"lora_a", "lora_b", "adapter", "bias"},
        "weight-and-bias": {"weight", "bias"},
        "all": set(names),
    }[which]
    output_mask = tuple(name in asked for name in names)
    t = case.tensors
    stride, padding, dilation = spec.geometry()
    if sppara:
        got = triton_backend.sppara_conv_backward(case.grad_out, t["x"], t["weight"], t["adapter"], case.in_idx,
                                                  case.out_idx, stride, padding, dilation, 1, output_mask)
    else:
        got = triton_backend.splora_conv_backward(case.grad_out, t["x"], t["weight"], t["lora_a"], t["lora_b"],
                                                  case.in_idx, case.out_idx, spec.scale, stride, padding, dilation,
                                                  1, output_mask)
    expected = run_dense(case, torch.float64)
    for name, want, grad in zip(names, output_mask, got, strict=True):
        if not want:
            assert grad is None, f"{name} gradient computed although not asked for"
            continue
        largest = float(expected[name].abs().max())
        error, report = max_error(grad, expected[name])
        assert error <= 1e-4 * largest, f"{name}: {report}"


@needs_interpreter
def test_frozen_weight_costs_no_weight_gradient_work(monkeypatch):
    """With W frozen, no kernel writes a weight-shaped tensor; with W trainable exactly one does."""
    from spa_kernels.backend.triton import conv_backward

    targets = []
    original = conv_backward.weight_grad

    def recording(left, left_idx, right, right_idx, out, shape, column_sum=None):
        targets.append(tuple(out.shape))
        return original(left, left_idx, right, right_idx, out, shape, column_sum)

    monkeypatch.setattr(conv_backward, "weight_grad", recording)
    spec = Spec(batch=1, in_channels=5, out_channels=4, rank=3)
    run_triton(make_case(spec, torch.float32), torch.float32)
    weight_shaped = (4, 5, 3, 3)
    assert weight_shaped not in targets and sorted(targets) == [(3, 5, 1, 1, 1), (4, 3, 1, 1, 1)]  # dA and dB
    targets.clear()
    run_triton(make_case(dataclasses.replace(spec, weight_grad=True), torch.float32), torch.float32)
    assert targets.count((4, 5, 1, 3, 3)) == 1  # dW, seen with three spatial dims


@needs_interpreter
@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
def test_kernels_never_touch_inactive_outputs(transposed):
    """The implicit GEMM writes active channels only: NaN elsewhere stays NaN."""
    from spa_kernels.backend.triton import conv

    case = make_case(Spec(in_channels=9, out_channels=10, stride=2, size=6, keep_in=0.3, keep_out=0.3),
                     torch.float32)
    t = case.tensors
    stride, padding, dilation = case.spec.geometry()
    shape = conv.conv_shape(t["x"], t["weight"], stride, padding, dilation)
    weight = conv.as_5d(t["weight"])
    if transposed:  # dx: active input channels written from the active outputs
        src, out, k_idx, n_idx, active_idx = case.grad_out, torch.full_like(t["x"], float("nan")), \
            case.out_idx, case.in_idx, case.in_idx
    else:
        src, out, k_idx, n_idx, active_idx = t["x"], torch.full_like(case.grad_out, float("nan")), \
            case.in_idx, case.out_idx, case.out_idx
        weight = weight.transpose(0, 1)
    conv.implicit_gemm(conv.as_5d(src), weight, k_idx, n_idx, conv.as_5d(out), shape, transposed=transposed)
    active = torch.zeros(out.shape[1], dtype=torch.bool)
    active[active_idx] = True
    assert torch.isnan(out[:, ~active]).all()
    assert not torch.isnan(out[:, active]).any()


@needs_interpreter
@pytest.mark.parametrize("sppara", [False, True], ids=["splora", "sppara"])
def test_pruned_inputs_are_never_read(sppara):
    """NaN in every pruned entry of every operand leaves the result unchanged."""
    spec = Spec(sppara=sppara, in_channels=8, out_channels=9, rank=3, stride=2, size=6, weight_grad=True)
    clean = make_case(spec, torch.float32)
    poisoned = make_case(spec, torch.float32)
    in_pruned = ~_mask(clean.in_idx, spec.in_channels, "cpu")
    out_pruned = ~_mask(clean.out_idx, spec.out_channels, "cpu")
    nan = float("nan")
    p = poisoned.tensors
    p["x"][:, in_pruned] = nan
    p["weight"][out_pruned] = nan
    p["weight"][:, in_pruned] = nan
    if sppara:
        p["adapter"][out_pruned] = nan
        p["adapter"][:, in_pruned] = nan
    else:
        p["lora_a"][:, in_pruned] = nan
        p["lora_b"][out_pruned] = nan
    p["bias"][out_pruned] = nan
    poisoned.grad_out[:, out_pruned] = nan
    expected = run_backend(clean, triton_backend, torch.float32)
    got = run_backend(poisoned, triton_backend, torch.float32)
    for key in expected:
        assert torch.equal(got[key], expected[key]), f"{key} changed when pruned entries hold NaN"


@needs_interpreter
def test_backend_checks_what_it_relies_on():
    x, weight = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3)
    geometry = ((1, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="groups"):
        triton_backend.splora_conv_forward(x, weight, None, None, None, None, None, 1.0, *geometry, 2)
    with pytest.raises(ValueError, match="odd"):
        triton_backend.splora_conv_forward(x, torch.randn(6, 4, 2, 2), None, None, None, None, None, 1.0,
                                           *geometry, 1)
    with pytest.raises(TypeError, match="triton"):
        triton_backend.splora_conv_forward(x.double(), weight.double(), None, None, None, None, None, 1.0,
                                           *geometry, 1)
    with pytest.raises(ValueError, match="adapter"):
        triton_backend.sppara_conv_forward(x, weight, torch.randn(6, 3), None, None, None, *geometry, 1)
    with pytest.raises(ValueError, match="values each"):
        triton_backend.splora_conv_forward(x, weight, None, None, None, None, None, 1.0, (1,), (1,), (1,), 1)
    with pytest.raises(ValueError, match="smaller than"):
        triton_backend.splora_conv_forward(x, torch.randn(6, 4, 7, 7), None, None, None, None, None, 1.0,
                                           (1, 1), (0, 0), (1, 1), 1)


@needs_interpreter
@pytest.mark.skipif(not PUBLIC_API, reason="the public convolution functions are not in this checkout")
def test_auto_never_picks_the_interpreter():
    x, weight = torch.randn(1, 3, 4, 4), torch.randn(2, 3, 3, 3)
    from spa_kernels import backend as backend_policy

    assert backend_policy.resolve(None, x.device, x.dtype, op="splora_conv").name != "triton"
    spa_kernels.splora_conv2d(x, weight, padding=1)


# --------------------------------------------------------------------------- GPU code generation


def compile_every_conv_kernel_for_gpu(capabilities: tuple[int, ...]) -> None:
    """Compile each convolution kernel to a cubin for the given CUDA compute capabilities; no GPU needed.

    Runs in a process without ``TRITON_INTERPRET``, where the kernels are real
    JIT functions.  Variants: the implicit GEMM forward and transposed with every
    index and fused term on and the unit dims a conv2d launch specialises to
    constants; the rank pre-pass shape (one tap, everything off, 3-D); the
    weight-gradient kernel with everything on and off; the bias-gradient kernel.
    Small tiles keep compile time down: the code paths, not the tile sizes, are
    what can fail to lower.
    """
    from spa_kernels.backend.triton import conv, conv_backward

    assert not conv.INTERPRETED, "kernels were decorated for the interpreter"

    def build(kernel, pointer_dtypes, constexprs, config, capability, ones=()):
        compile_for_gpu(kernel, pointer_dtypes, constexprs, config, capability, ones=ones)

    common = {"INPUT_PRECISION": "ieee", "IN_INTERPRETER": False}
    gemm_config = conv.autotune_config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, 4, 3)
    weight_grad_config = conv.autotune_config({"BLOCK_LEFT": 32, "BLOCK_RIGHT": 16, "BLOCK_M": 32}, 4, 3)
    conv2d_unit_dims = ("OUT_D", "SRC_D", "KERNEL_D", "CONV_STRIDE_D", "DIL_D", "stride_src_w", "stride_out_w")
    for capability in capabilities:
        for transposed in (False, True):
            build(
                conv.splora_conv_implicit_gemm_kernel,
                {"default": "bf16", "low_ptr": "fp32", "k_idx_ptr": "i64", "n_idx_ptr": "i64"},
                {**common, "SPATIAL_DIMS": 2, "TRANSPOSED": transposed, "HAS_K_IDX": True, "HAS_N_IDX": True,
                 "HAS_LOW_RANK": True, "HAS_ADAPTER": True, "HAS_BIAS": True, "BLOCK_R": 64, "GROUP": 8},
                gemm_config, capability, ones=conv2d_unit_dims,
            )
        build(
            conv.splora_conv_implicit_gemm_kernel,
            {"default": "fp32", "k_idx_ptr": "i64", "n_idx_ptr": "i64"},
            {**common, "SPATIAL_DIMS": 3, "TRANSPOSED": False, "HAS_K_IDX": False, "HAS_N_IDX": False,
             "HAS_LOW_RANK": False, "HAS_ADAPTER": False, "HAS_BIAS": False, "BLOCK_R": 16, "GROUP": 8},
            gemm_config, capability, ones=("TAPS", "KERNEL_D", "KERNEL_H", "KERNEL_W"),
        )
        for dtype, on in (("bf16", True), ("fp32", False)):
            build(
                conv_backward.splora_conv_weight_grad_kernel,
                {"default": dtype, "right_ptr": "fp32" if on else dtype, "left_idx_ptr": "i64",
                 "right_idx_ptr": "i64"},
                {**common, "SPATIAL_DIMS": 3 if on else 1, "HAS_LEFT_IDX": on, "HAS_RIGHT_IDX": not on,
                 "COLUMN_SUM": on, "GROUP": 8},
                weight_grad_config, capability,
            )
        build(
            conv_backward.splora_conv_bias_grad_kernel,
            {"default": "bf16", "idx_ptr": "i64"},
            {"HAS_IDX": True, "IN_INTERPRETER": False, "BLOCK_N": 32, "BLOCK_M": 256},
            None, capability,
        )




@pytest.mark.skipif(not has_nvidia_compiler(), reason="this Triton has no NVIDIA code generator")
def test_conv_kernels_compile_for_hopper_and_ampere():
    """What the interpreter cannot check: every kernel lowers through ptxas for sm_90 and sm_80."""
    done = run_without_interpreter(__file__, "compile_every_conv_kernel_for_gpu((90, 80))")
    assert done.returncode == 0, done.stderr[-4000:]


# --------------------------------------------------------------------------- CUDA

BIG = {
    "resnet-3x3": Spec(batch=4, in_channels=64, out_channels=64, size=14, rank=8),
    "resnet-3x3-stride2-weight-grad": Spec(batch=4, in_channels=96, out_channels=80, size=15, stride=2,
                                           padding=1, rank=8, weight_grad=True),
    "keep0.1": Spec(batch=2, in_channels=128, out_channels=128, size=9, keep_in=0.1, keep_out=0.1, rank=16),
    "1x1-no-indices": Spec(batch=3, in_channels=70, out_channels=130, size=11, kernel=1, padding=0,
                           keep_in=None, keep_out=None, rank=4),
    "5x5-dilation2": Spec(batch=2, in_channels=33, out_channels=47, size=17, kernel=5, dilation=2, rank=5),
    "1d": Spec(dims=1, batch=4, in_channels=100, out_channels=90, size=61, kernel=5, stride=2, rank=12,
               weight_grad=True),
    "3d": Spec(dims=3, batch=2, in_channels=24, out_channels=40, size=7, stride=(1, 2, 2), rank=6),
    "sppara": Spec(sppara=True, batch=4, in_channels=64, out_channels=72, size=12, stride=2, weight_grad=True),
    "all-pruned": Spec(batch=2, in_channels=64, out_channels=64, size=8, keep_in=0.0, keep_out=0.0,
                       weight_grad=True),
    "one-channel": Spec(batch=2, in_channels=65, out_channels=65, size=9, keep_in=1, keep_out=1),
}


@needs_cuda
@pytest.mark.parametrize("name", list(BIG))
def test_cuda_bfloat16_matches_float64(name):
    check(make_case(BIG[name], torch.bfloat16, device="cuda"), torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", ["resnet-3x3-stride2-weight-grad", "sppara", "3d"])
def test_cuda_other_dtypes_match_float64(name, dtype):
    check(make_case(BIG[name], dtype, device="cuda"), dtype)


@needs_cuda
@pytest.mark.parametrize("name", ["2d-stride-exceeds-input", "all-ones", "all-pruned", "rank17", "sppara-3d-batch1"])
def test_cuda_small_shapes(name):
    check(make_case(SMALL[name], torch.bfloat16, device="cuda"), torch.bfloat16)
