"""The op layer's compact activations: registration, fake kernels, and who widens.

- ``torch.library.opcheck`` on the compact forms of every op (schema, fake
  kernel, autograd, AOT dispatch).
- Backends that take compact activations get them as they are: the op layer
  never builds a full-width tensor for them.
- A backend without the capability is served by widening x (and grad_out) with
  zeros and narrowing y (and grad_x): checked with a stand-in backend whose
  kernels are the reference's but refuse the compact keywords.
"""

from __future__ import annotations

import types

import pytest
import torch

import spa_kernels
from spa_kernels import functional as F
from spa_kernels.backend import Backend, Capabilities, get, register_backend, registered, unregister_backend
from spa_kernels.backend import reference as reference_backend
from spa_kernels.ops import library

NATIVE = [name for name in ("reference", "cpu") if name in spa_kernels.backends("cpu")]
FLAGS = [(True, False), (False, True), (True, True)]
FLAG_IDS = ["in", "out", "both"]


def _linear_args(dtype=torch.float32, requires_grad=True):
    gen = torch.Generator().manual_seed(3)
    in_idx, out_idx = torch.tensor([1, 2, 5]), torch.tensor([0, 4])
    x = torch.randn(4, 3, generator=gen, dtype=dtype)
    weight = torch.randn(6, 7, generator=gen, dtype=dtype)
    lora_a = torch.randn(2, 7, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    lora_b = torch.randn(6, 2, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    bias = torch.randn(6, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    return x, weight, lora_a, lora_b, bias, in_idx, out_idx


def _conv_args(kind: str, requires_grad=True):
    gen = torch.Generator().manual_seed(4)
    in_idx, out_idx = torch.tensor([0, 3]), torch.tensor([1, 2, 4])
    x = torch.randn(2, 2, 5, 5, generator=gen)
    weight = torch.randn(5, 4, 3, 3, generator=gen)
    bias = torch.randn(5, generator=gen).requires_grad_(requires_grad)
    if kind == "splora":
        adapters = (torch.randn(2, 4, generator=gen).requires_grad_(requires_grad),
                    torch.randn(5, 2, generator=gen).requires_grad_(requires_grad))
    else:
        adapters = (torch.randn(5, 4, generator=gen).requires_grad_(requires_grad),)
    return x, weight, adapters, bias, in_idx, out_idx


# --------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize(("compact_input", "compact_output"), FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("backend", NATIVE)
def test_opcheck_linear_compact(backend, compact_input, compact_output):
    x, weight, a, b, bias, in_idx, out_idx = _linear_args()
    if not compact_input:
        x = torch.randn(4, 7)
    torch.library.opcheck(torch.ops.spa_kernels.splora_linear.default,
                          (x, weight, a, b, bias, in_idx, out_idx, 0.5, backend, compact_input, compact_output))
    grad_out = torch.randn(4, 2 if compact_output else 6)
    torch.library.opcheck(
        torch.ops.spa_kernels.splora_linear_backward.default,
        (grad_out, x, weight, a.detach(), b.detach(), in_idx, out_idx, 0.5, backend, [True, True, True, True, True],
         compact_input, compact_output),
    )


@pytest.mark.parametrize("kind", ["splora", "sppara"])
@pytest.mark.parametrize("backend", NATIVE)
def test_opcheck_conv_compact(backend, kind):
    x, weight, adapters, bias, in_idx, out_idx = _conv_args(kind)
    geometry = ([2, 2], [1, 1], [1, 1], 1)
    if kind == "splora":
        forward = (x, weight, *adapters, bias, in_idx, out_idx, *geometry, 0.5, backend, True, True)
        op, backward_op = torch.ops.spa_kernels.splora_conv.default, torch.ops.spa_kernels.splora_conv_backward.default
        backward = (torch.randn(2, 3, 3, 3), x, weight, *(t.detach() for t in adapters), in_idx, out_idx, *geometry,
                    0.5, backend, [True, True, True, True, True], True, True)
    else:
        forward = (x, weight, *adapters, bias, in_idx, out_idx, *geometry, backend, True, True)
        op, backward_op = torch.ops.spa_kernels.sppara_conv.default, torch.ops.spa_kernels.sppara_conv_backward.default
        backward = (torch.randn(2, 3, 3, 3), x, weight, adapters[0].detach(), in_idx, out_idx, *geometry, backend,
                    [True, True, True, True], True, True)
    torch.library.opcheck(op, forward)
    torch.library.opcheck(backward_op, backward)


def test_fake_kernels_give_compact_shapes():
    x, weight, a, b, bias, in_idx, out_idx = _linear_args(requires_grad=False)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (x, weight, a, b, bias, in_idx, out_idx)]
        y = torch.ops.spa_kernels.splora_linear(*fake, 1.0, "reference", True, True)
        assert tuple(y.shape) == (4, 2)
        cx, cw, (ca, cb), cbias, cin, cout = _conv_args("splora", requires_grad=False)
        fake = [mode.from_tensor(t) for t in (cx, cw, ca, cb, cbias, cin, cout)]
        y = torch.ops.spa_kernels.splora_conv(*fake, [1, 1], [1, 1], [1, 1], 1, 1.0, "reference", True, True)
        assert tuple(y.shape) == (2, 3, 5, 5)


# --------------------------------------------------------------------------- native backends are not widened


@pytest.mark.parametrize("backend", NATIVE)
def test_native_backends_never_widen(backend, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the op layer widened an activation for a backend that takes compact ones")

    monkeypatch.setattr(library, "widen_channels", refuse)
    monkeypatch.setattr(library, "narrow_channels", refuse)
    x, weight, a, b, bias, in_idx, out_idx = _linear_args()
    x.requires_grad_()
    y = F.splora_linear(x, weight, a, b, bias, in_idx, out_idx, backend=backend, compact_input=True,
                        compact_output=True)
    y.sum().backward()
    assert x.grad.shape == x.shape
    cx, cw, (ca, cb), cbias, cin, cout = _conv_args("splora")
    cx.requires_grad_()
    y = F.splora_conv2d(cx, cw, ca, cb, cbias, cin, cout, padding=1, backend=backend, compact_input=True,
                        compact_output=True)
    y.sum().backward()
    assert cx.grad.shape == cx.shape


# --------------------------------------------------------------------------- widening for other backends


def _refusing(fn):
    """``fn`` without the compact keywords: what a backend without compact kernels looks like."""
    def kernel(*args):
        return fn(*args)
    return kernel


@pytest.fixture
def widening_backend():
    """A stand-in backend, registered under an unused name, with the reference's kernels and no compact support."""
    free = [name for name in ("cuda", "triton") if name not in registered()]
    if not free:
        pytest.skip("every backend name is taken here; the stand-in needs a free one")
    name = free[0]
    kernels = types.SimpleNamespace(**{
        entry: _refusing(getattr(reference_backend, entry))
        for entry in ("splora_linear_forward", "splora_linear_backward", "splora_conv_forward",
                      "splora_conv_backward", "sppara_conv_forward", "sppara_conv_backward")
    })
    register_backend(Backend(name, Capabilities(devices=None, dtypes=(torch.float32, torch.float64)),
                             kernels=(kernels,)))
    assert not get(name).capabilities.compact_activations
    try:
        yield name
    finally:
        unregister_backend(name)


@pytest.mark.parametrize(("compact_input", "compact_output"), FLAGS, ids=FLAG_IDS)
def test_linear_widening_matches_native(widening_backend, compact_input, compact_output):
    results = []
    for backend in (widening_backend, "reference"):
        x, weight, a, b, bias, in_idx, out_idx = _linear_args(torch.float64)
        if not compact_input:
            x = torch.randn(4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        x.requires_grad_()
        y = F.splora_linear(x, weight, a, b, bias, in_idx, out_idx, backend=backend, compact_input=compact_input,
                            compact_output=compact_output)
        (y * torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        results.append((y.detach(), x.grad, a.grad, b.grad, bias.grad))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["splora", "sppara"])
def test_conv_widening_matches_native(widening_backend, kind):
    results = []
    for backend in (widening_backend, "reference"):
        x, weight, adapters, bias, in_idx, out_idx = _conv_args(kind)
        x.requires_grad_()
        if kind == "splora":
            y = F.splora_conv2d(x, weight, *adapters, bias, in_idx, out_idx, stride=2, padding=1, backend=backend,
                                compact_input=True, compact_output=True)
        else:
            y = F.sppara_conv2d(x, weight, *adapters, bias, in_idx, out_idx, stride=2, padding=1, backend=backend,
                                compact_input=True, compact_output=True)
        assert y.shape == (2, 3, 3, 3)
        (y * torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        results.append((y.detach(), x.grad, bias.grad, *(t.grad for t in adapters)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", NATIVE)
def test_compact_linear_compiles_without_graph_breaks(backend):
    def run(x, weight, a, b, bias, in_idx, out_idx):
        return F.splora_linear_trusted(x, weight, a, b, bias, in_idx, out_idx, 0.5, backend, True, True)

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (run, compiled):
        x, weight, a, b, bias, in_idx, out_idx = _linear_args()
        x.requires_grad_()
        y = fn(x, weight, a, b, bias, in_idx, out_idx)
        y.sum().backward()
        results.append((y.detach(), x.grad, a.grad, b.grad, bias.grad))
    assert results[0][0].shape == (4, 2)
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want)
