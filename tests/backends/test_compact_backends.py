"""Compact activations (``compact_input``/``compact_output``) on every backend.

A compact call must equal the full-width call on the scattered input followed
by gathering the active outputs, forward and every gradient: the gradient of
``x`` comes back compact, parameter gradients full (zero where inactive).  Each
case is checked twice: against that full-width call on the same backend and
dtype (tight), and against the float64 reference (within the dtype's error).

``reference`` and ``cpu`` read and write compact tensors natively; ``triton``
(under the interpreter on CPU) has no compact kernels and goes through the op
layer's widening, so it gets a small subset.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import spa_kernels
from spa_kernels import functional as F

AVAILABLE = spa_kernels.backends("cpu")
NATIVE = [name for name in ("reference", "cpu") if name in AVAILABLE]
FLAGS = [(True, False), (False, True), (True, True)]
FLAG_IDS = ["in", "out", "both"]


def _indices(keep, size: int, gen: torch.Generator):
    if keep is None:
        return None
    return torch.randperm(size, generator=gen)[:keep].sort().values


@dataclasses.dataclass
class Problem:
    """Full-width float64 operands; ``compact`` narrows x and grad_out."""

    x: torch.Tensor
    params: dict
    in_idx: torch.Tensor | None
    out_idx: torch.Tensor | None
    grad_out: torch.Tensor  # over the active outputs only; widened for full-width calls
    call: callable  # (x, params, in_idx, out_idx, backend, compact_input, compact_output) -> y


def _take(t, dim, idx):
    return t if idx is None else t.index_select(dim, idx)


def _run(problem: Problem, dtype, backend, compact_input, compact_output, channel_dim):
    """y and the gradients of every operand that requires one, for the given flags."""
    x = problem.x.to(dtype)
    if compact_input:
        x = _take(x, channel_dim, problem.in_idx)
    x = x.detach().requires_grad_()
    params = {k: v.to(dtype).detach().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
              for k, v in problem.params.items()}
    y = problem.call(x, params, problem.in_idx, problem.out_idx, backend, compact_input, compact_output)
    grad_out = problem.grad_out if compact_output else _widen(problem.grad_out, channel_dim, problem.out_idx, y.shape)
    leaves = {"x": x, **{k: v for k, v in params.items() if isinstance(v, torch.Tensor) and v.requires_grad}}
    grads = torch.autograd.grad(y, list(leaves.values()), grad_outputs=grad_out.to(dtype), allow_unused=True)
    return y.detach(), dict(zip(leaves, grads, strict=True))


def _widen(compact, dim, idx, full_shape):
    if idx is None:
        return compact
    out = compact.new_zeros(full_shape)
    return out.index_copy_(dim, idx, compact)


def _check(problem: Problem, backend: str, dtype, compact_input, compact_output, channel_dim, tol):
    y, grads = _run(problem, dtype, backend, compact_input, compact_output, channel_dim)
    # The same backend and dtype at full width, narrowed afterwards.
    y_full, grads_full = _run(problem, dtype, backend, False, False, channel_dim)
    # float64 truth from the reference backend at full width.
    y_true, grads_true = _run(problem, torch.float64, "reference", False, False, channel_dim)
    if compact_output:
        y_full, y_true = _take(y_full, channel_dim, problem.out_idx), _take(y_true, channel_dim, problem.out_idx)
    if compact_input:
        grads_full["x"] = _take(grads_full["x"], channel_dim, problem.in_idx)
        grads_true["x"] = _take(grads_true["x"], channel_dim, problem.in_idx)
    expected_x_shape = problem.x.shape if not compact_input else _take(problem.x, channel_dim, problem.in_idx).shape
    assert grads["x"].shape == expected_x_shape
    assert y.shape == y_full.shape and y.dtype == dtype
    same = dict(rtol=1e-5, atol=1e-5) if dtype in (torch.float32, torch.float64) else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, y_full, **same)
    torch.testing.assert_close(y.double(), y_true, rtol=tol, atol=tol)
    assert set(grads) == set(grads_true)
    for name, grad in grads.items():
        assert grad.shape == grads_true[name].shape, name
        torch.testing.assert_close(grad, grads_full[name], **same, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(grad.double(), grads_true[name], rtol=tol, atol=tol,
                                   msg=lambda m, n=name: f"{n} vs float64: {m}")


# --------------------------------------------------------------------------- linear


def _linear_call(x, p, in_idx, out_idx, backend, compact_input, compact_output):
    return F.splora_linear(x, p["weight"], p["lora_a"], p["lora_b"], p["bias"], in_idx, out_idx, scale=0.7,
                           backend=backend, compact_input=compact_input, compact_output=compact_output)


LINEAR_CASES = {
    "2d": dict(lead=(9,), in_f=13, out_f=11, rank=3, keep_in=6, keep_out=5),
    "3d-x": dict(lead=(2, 5), in_f=20, out_f=17, rank=4, keep_in=9, keep_out=8),
    "weight-grad": dict(lead=(7,), in_f=12, out_f=10, rank=2, keep_in=5, keep_out=4, weight_grad=True),
    "no-adapter": dict(lead=(6,), in_f=9, out_f=7, rank=None, keep_in=4, keep_out=3),
    "all-active": dict(lead=(5,), in_f=8, out_f=6, rank=2, keep_in=None, keep_out=None),
    "outputs-pruned": dict(lead=(4,), in_f=8, out_f=6, rank=2, keep_in=3, keep_out=0),
    "inputs-pruned": dict(lead=(4,), in_f=8, out_f=6, rank=2, keep_in=0, keep_out=3),
    "wide": dict(lead=(33,), in_f=96, out_f=80, rank=5, keep_in=41, keep_out=37, weight_grad=True),
}


def _linear_problem(lead, in_f, out_f, rank, keep_in, keep_out, weight_grad=False, bias=True) -> Problem:
    gen = torch.Generator().manual_seed(in_f * 131 + out_f)
    d = torch.float64
    params = {
        "weight": torch.randn(out_f, in_f, generator=gen, dtype=d).requires_grad_(weight_grad),
        "lora_a": None if rank is None else torch.randn(rank, in_f, generator=gen, dtype=d).requires_grad_(),
        "lora_b": None if rank is None else torch.randn(out_f, rank, generator=gen, dtype=d).requires_grad_(),
        "bias": torch.randn(out_f, generator=gen, dtype=d).requires_grad_() if bias else None,
    }
    in_idx, out_idx = _indices(keep_in, in_f, gen), _indices(keep_out, out_f, gen)
    n_out = out_f if out_idx is None else out_idx.numel()
    x = torch.randn(*lead, in_f, generator=gen, dtype=d)
    grad_out = torch.randn(*lead, n_out, generator=gen, dtype=d)
    return Problem(x, params, in_idx, out_idx, grad_out, _linear_call)


@pytest.mark.parametrize(("compact_input", "compact_output"), FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("case", list(LINEAR_CASES))
@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_linear_compact(backend, case, compact_input, compact_output, dtype):
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    problem = _linear_problem(**LINEAR_CASES[case])
    _check(problem, backend, dtype, compact_input, compact_output, -1, tol)


@pytest.mark.parametrize("backend", NATIVE)
def test_linear_compact_bfloat16_smoke(backend):
    problem = _linear_problem(**LINEAR_CASES["3d-x"])
    _check(problem, backend, torch.bfloat16, True, True, -1, tol=0.25)


@pytest.mark.parametrize("backend", NATIVE)
def test_linear_compact_output_has_only_active_columns(backend):
    problem = _linear_problem(**LINEAR_CASES["2d"])
    x = problem.x.float()[:, problem.in_idx]
    p = {k: v.float() for k, v in problem.params.items()}
    y = _linear_call(x, p, problem.in_idx, problem.out_idx, backend, True, True)
    assert y.shape == (9, 5)
    assert (y != 0).all()  # a compact output has no zero columns standing for pruned channels


# --------------------------------------------------------------------------- conv


def _splora_conv_call(x, p, in_idx, out_idx, backend, compact_input, compact_output):
    conv = {1: F.splora_conv1d, 2: F.splora_conv2d, 3: F.splora_conv3d}[x.dim() - 2]
    return conv(x, p["weight"], p["lora_a"], p["lora_b"], p["bias"], in_idx, out_idx, scale=0.5,
                backend=backend, compact_input=compact_input, compact_output=compact_output, **p["geometry"])


def _sppara_conv_call(x, p, in_idx, out_idx, backend, compact_input, compact_output):
    conv = {1: F.sppara_conv1d, 2: F.sppara_conv2d, 3: F.sppara_conv3d}[x.dim() - 2]
    return conv(x, p["weight"], p["adapter"], p["bias"], in_idx, out_idx, backend=backend,
                compact_input=compact_input, compact_output=compact_output, **p["geometry"])


CONV_CASES = {
    "splora-2d-stride2-pad1": dict(d=2, c_in=10, c_out=9, keep_in=4, keep_out=5, stride=2, padding=1),
    "splora-1d-dilated": dict(d=1, c_in=7, c_out=6, keep_in=3, keep_out=4, padding=2, dilation=2, kernel=5),
    "splora-2d-weight-grad": dict(d=2, c_in=6, c_out=5, keep_in=3, keep_out=2, padding=1, weight_grad=True),
    "splora-2d-all-active": dict(d=2, c_in=5, c_out=4, keep_in=None, keep_out=None, padding=1),
    "splora-2d-outputs-pruned": dict(d=2, c_in=5, c_out=4, keep_in=2, keep_out=0, padding=1),
    "splora-2d-inputs-pruned": dict(d=2, c_in=5, c_out=4, keep_in=0, keep_out=2, padding=1),
    "splora-3d": dict(d=3, c_in=4, c_out=3, keep_in=2, keep_out=2, padding=1, spatial=4),
    "splora-2d-no-adapter": dict(d=2, c_in=6, c_out=5, keep_in=3, keep_out=3, rank=None, stride=2),
    # Pointwise convolutions: x (and dy) read in place; strided, dx is scattered onto every other position.
    "splora-2d-1x1-stride2": dict(d=2, c_in=7, c_out=6, keep_in=4, keep_out=3, kernel=1, stride=2),
    "splora-2d-1x1": dict(d=2, c_in=6, c_out=7, keep_in=3, keep_out=4, kernel=1, spatial=6),
    "sppara-3d-1x1-stride2": dict(kind="sppara", d=3, c_in=5, c_out=4, keep_in=3, keep_out=2, kernel=1, stride=2,
                                  spatial=4),
    "sppara-2d-stride2": dict(kind="sppara", d=2, c_in=8, c_out=7, keep_in=5, keep_out=3, stride=2, padding=1),
    "sppara-1d-weight-grad": dict(kind="sppara", d=1, c_in=6, c_out=5, keep_in=2, keep_out=3, weight_grad=True),
    "splora-grouped": dict(d=2, c_in=8, c_out=6, keep_in=5, keep_out=3, padding=1, groups=2),
    "sppara-grouped": dict(kind="sppara", d=1, c_in=6, c_out=6, keep_in=4, keep_out=4, padding=1, groups=3),
}


def _conv_problem(d, c_in, c_out, keep_in, keep_out, kind="splora", rank=2, stride=1, padding=0, dilation=1,
                  kernel=3, spatial=7, groups=1, weight_grad=False, batch=2) -> Problem:
    gen = torch.Generator().manual_seed(c_in * 97 + c_out * 7 + d)
    f64 = torch.float64
    group_in = c_in // groups
    params = {
        "weight": torch.randn(c_out, group_in, *(kernel,) * d, generator=gen, dtype=f64).requires_grad_(weight_grad),
        "bias": torch.randn(c_out, generator=gen, dtype=f64).requires_grad_(),
        "geometry": dict(stride=stride, padding=padding, dilation=dilation, groups=groups),
    }
    if kind == "splora":
        params["lora_a"] = None if rank is None else torch.randn(rank, group_in, generator=gen, dtype=f64).requires_grad_()
        params["lora_b"] = None if rank is None else torch.randn(c_out, rank, generator=gen, dtype=f64).requires_grad_()
    else:
        params["adapter"] = torch.randn(c_out, group_in, generator=gen, dtype=f64).requires_grad_()
    in_idx, out_idx = _indices(keep_in, c_in, gen), _indices(keep_out, c_out, gen)
    x = torch.randn(batch, c_in, *(spatial,) * d, generator=gen, dtype=f64)
    call = _splora_conv_call if kind == "splora" else _sppara_conv_call
    return Problem(x, params, in_idx, out_idx, torch.empty(0), call)


def _with_grad_out(problem: Problem) -> Problem:
    """A grad_out over the active outputs, shaped from a full-width forward."""
    with torch.no_grad():
        y = problem.call(problem.x, _detached(problem.params), problem.in_idx, problem.out_idx, "reference",
                         False, False)
    gen = torch.Generator().manual_seed(5)
    grad_out = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    problem.grad_out = _take(grad_out, 1, problem.out_idx)
    return problem


def _detached(params):
    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in params.items()}


def _conv_backends(case: str) -> list[str]:
    return ["reference"] if CONV_CASES[case].get("groups", 1) != 1 else NATIVE


_CONV_PARAMS = [pytest.param(case, backend, id=f"{backend}-{case}") for case in CONV_CASES
                for backend in _conv_backends(case)]


@pytest.mark.parametrize(("compact_input", "compact_output"), FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize(("case", "backend"), _CONV_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_conv_compact(case, backend, compact_input, compact_output, dtype):
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    problem = _with_grad_out(_conv_problem(**CONV_CASES[case]))
    _check(problem, backend, dtype, compact_input, compact_output, 1, tol)


@pytest.mark.parametrize("backend", NATIVE)
def test_conv_compact_bfloat16_smoke(backend):
    problem = _with_grad_out(_conv_problem(**CONV_CASES["splora-2d-stride2-pad1"]))
    _check(problem, backend, torch.bfloat16, True, True, 1, tol=0.5)


# --------------------------------------------------------------------------- triton, through the op layer's widening


@pytest.mark.skipif("triton" not in AVAILABLE, reason="the triton backend is not available here")
@pytest.mark.parametrize(("compact_input", "compact_output"), [(True, True), (True, False)], ids=["both", "in"])
def test_triton_linear_compact_through_widening(compact_input, compact_output):
    problem = _linear_problem(lead=(6,), in_f=12, out_f=10, rank=2, keep_in=5, keep_out=4)
    _check(problem, "triton", torch.float32, compact_input, compact_output, -1, 1e-4)


@pytest.mark.skipif("triton" not in AVAILABLE, reason="the triton backend is not available here")
@pytest.mark.parametrize("kind", ["splora", "sppara"])
def test_triton_conv_compact_through_widening(kind):
    spec = dict(kind=kind, d=2, c_in=6, c_out=5, keep_in=3, keep_out=2, padding=1, spatial=5, batch=1)
    problem = _with_grad_out(_conv_problem(**spec))
    _check(problem, "triton", torch.float32, True, True, 1, 1e-4)
