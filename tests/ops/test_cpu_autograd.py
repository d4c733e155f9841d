"""The cpu backend's C++ autograd (``torch.ops.spa_kernels_cpu.splora_linear`` and ``.conv``).

Eager calls on the cpu backend run these ops, whose backward never enters
Python, through the extension's bindings of them (``_C.splora_linear``, ``_C.conv``);
every test here runs both entries.  They must give exactly what the dispatched ``spa_kernels`` op gives
(the same kernels behind the Python autograd formula): the output and every
gradient, bit for bit, over leading shapes, index lists, compact activations,
both shapes of the adapter factors, and under no_grad and inference mode.
"""

from __future__ import annotations

import pytest
import torch

import spa_kernels
from spa_kernels import _extension

pytestmark = pytest.mark.skipif("cpu" not in spa_kernels.backends("cpu"), reason="the cpu backend is not built")

IN, OUT, RANK = 6, 5, 2
IN_IDX = torch.tensor([0, 2, 3, 5])
OUT_IDX = torch.tensor([1, 2, 4])


@pytest.fixture(params=["dispatched", "binding"])
def fused_linear(request):
    """The C++ autograd op for linear layers, through the dispatcher or the extension's binding."""
    if request.param == "dispatched":
        return torch.ops.spa_kernels_cpu.splora_linear
    return _extension.extension.splora_linear


@pytest.fixture(params=["dispatched", "binding"])
def fused_conv(request):
    """The C++ autograd op for convolutions, through the dispatcher or the extension's binding."""
    if request.param == "dispatched":
        return torch.ops.spa_kernels_cpu.conv
    return _extension.extension.conv


def _leaf(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype).requires_grad_(True)


def _grads(y, leaves, grad_out):
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    return torch.autograd.grad(y, wanted, grad_out)


def _linear_case(lead, pruned, compact_input, compact_output, held_factors, bias):
    torch.manual_seed(0)
    in_idx, out_idx = (IN_IDX, OUT_IDX) if pruned else (None, None)
    x_width = len(in_idx) if compact_input and pruned else IN
    x = _leaf(*lead, x_width)
    weight = torch.randn(OUT, IN, dtype=torch.float64)
    lora_a = _leaf(*((1,) if held_factors else ()), RANK, IN)
    lora_b = _leaf(*((1,) if held_factors else ()), OUT, RANK)
    bias_t = _leaf(OUT) if bias else None
    return x, weight, lora_a, lora_b, bias_t, in_idx, out_idx


# Compact activations only where channels are pruned (unpruned, compact is full width).
LAYOUTS = [(False, (False, False)), (True, (False, False)), (True, (True, True)), (True, (True, False)),
           (True, (False, True))]


@pytest.mark.parametrize("lead", [(4,), (2, 3), (0,)])
@pytest.mark.parametrize(("pruned", "compact"), LAYOUTS)
@pytest.mark.parametrize("held_factors", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_the_dispatched_op(fused_linear, lead, pruned, compact, held_factors, bias):
    compact_input, compact_output = compact
    x, weight, lora_a, lora_b, bias_t, in_idx, out_idx = _linear_case(lead, pruned, *compact, held_factors, bias)
    args = (x, weight, lora_a, lora_b, bias_t, in_idx, out_idx, 0.7)
    fused = fused_linear(*args, compact_input, compact_output)
    dispatched = torch.ops.spa_kernels.splora_linear(*args, "cpu", compact_input, compact_output)
    assert fused.shape == dispatched.shape and torch.equal(fused, dispatched)
    assert not fused._is_view()
    grad_out = torch.randn_like(fused)
    leaves = (x, lora_a, lora_b, bias_t)
    for got, want, leaf in zip(_grads(fused, leaves, grad_out), _grads(dispatched, leaves, grad_out),
                               [t for t in leaves if t is not None], strict=True):
        assert got.shape == leaf.shape and torch.equal(got, want)


def test_linear_without_an_adapter_and_with_a_trainable_weight(fused_linear):
    x, weight = _leaf(3, IN), _leaf(OUT, IN)
    args = (x, weight, None, None, None, IN_IDX, OUT_IDX, 1.0)
    fused = fused_linear(*args)
    dispatched = torch.ops.spa_kernels.splora_linear(*args, "cpu")
    assert torch.equal(fused, dispatched)
    grad_out = torch.randn_like(fused)
    for got, want in zip(_grads(fused, (x, weight), grad_out), _grads(dispatched, (x, weight), grad_out), strict=True):
        assert torch.equal(got, want)


def _conv_case(kind, d, pruned, compact_input, compact_output, held_factors, stride):
    torch.manual_seed(1)
    in_idx, out_idx = (IN_IDX, OUT_IDX) if pruned else (None, None)
    x_channels = len(in_idx) if compact_input and pruned else IN
    x = _leaf(2, x_channels, *(7,) * d)
    weight = torch.randn(OUT, IN, *(3,) * d, dtype=torch.float64)
    if kind == "splora":
        lead = (1,) if held_factors else ()
        adapters = (_leaf(*lead, RANK, IN), _leaf(*lead, OUT, RANK), None)
    else:
        adapters = (None, None, _leaf(OUT, IN))
    geometry = ([stride] * d, [1] * d, [1] * d)
    return x, weight, adapters, _leaf(OUT), in_idx, out_idx, geometry


def _dispatched_conv(kind, x, weight, adapters, bias, in_idx, out_idx, geometry, scale, compact):
    lora_a, lora_b, adapter = adapters
    if kind == "splora":
        return torch.ops.spa_kernels.splora_conv(x, weight, lora_a, lora_b, bias, in_idx, out_idx, *geometry, 1,
                                                 scale, "cpu", *compact)
    return torch.ops.spa_kernels.sppara_conv(x, weight, adapter, bias, in_idx, out_idx, *geometry, 1, "cpu",
                                             *compact)


# SPPaRA's adapter is one 2-D parameter: only SPLoRA's factors come held.
KINDS = [("splora", False), ("splora", True), ("sppara", False)]


@pytest.mark.parametrize(("kind", "held_factors"), KINDS)
@pytest.mark.parametrize("d", [1, 2])
@pytest.mark.parametrize(("pruned", "compact"), LAYOUTS[:3])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_matches_the_dispatched_op(fused_conv, kind, held_factors, d, pruned, compact, stride):
    x, weight, adapters, bias, in_idx, out_idx, geometry = _conv_case(kind, d, pruned, *compact, held_factors, stride)
    scale = 0.7 if kind == "splora" else 1.0
    fused = fused_conv(x, weight, *adapters, bias, in_idx, out_idx, *geometry, scale, *compact)
    dispatched = _dispatched_conv(kind, x, weight, adapters, bias, in_idx, out_idx, geometry, scale, compact)
    assert torch.equal(fused, dispatched)
    grad_out = torch.randn_like(fused)
    leaves = (x, *adapters, bias)
    for got, want, leaf in zip(_grads(fused, leaves, grad_out), _grads(dispatched, leaves, grad_out),
                               [t for t in leaves if t is not None], strict=True):
        assert got.shape == leaf.shape and torch.equal(got, want)


def test_no_grad_and_inference_mode_run_the_forward_alone(fused_linear):
    x, weight, lora_a, lora_b, bias, in_idx, out_idx = _linear_case((3,), True, False, False, True, True)
    args = (x, weight, lora_a, lora_b, bias, in_idx, out_idx, 0.5)
    with_grad = fused_linear(*args)
    with torch.no_grad():
        plain = fused_linear(*args)
    with torch.inference_mode():
        inference = fused_linear(*args)
    assert plain.grad_fn is None and torch.equal(plain, with_grad) and torch.equal(inference, with_grad)


def test_an_in_place_op_after_the_layer_is_allowed_and_differentiated(fused_linear):
    x, weight, lora_a, lora_b, bias, in_idx, out_idx = _linear_case((2, 3), True, False, False, True, True)
    args = (x, weight, lora_a, lora_b, bias, in_idx, out_idx, 0.5)
    fused = fused_linear(*args).relu_()
    dispatched = torch.ops.spa_kernels.splora_linear(*args, "cpu").relu()
    grad_out = torch.randn_like(fused)
    leaves = (x, lora_a, lora_b, bias)
    for got, want in zip(_grads(fused, leaves, grad_out), _grads(dispatched, leaves, grad_out), strict=True):
        assert torch.equal(got, want)


def test_a_factor_with_a_leading_dimension_other_than_one_is_refused(fused_linear):
    x, weight, lora_a, lora_b, *_ = _linear_case((3,), False, False, False, True, False)
    with pytest.raises(ValueError, match="lora_a"):
        fused_linear(x, weight, lora_a.detach().expand(2, -1, -1), lora_b, None, None, None, 1.0)
