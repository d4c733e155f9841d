"""The convolution op family: schema, fake kernel and autograd of SPLoRA and SPPaRA convs.

The ops take an already-resolved backend name and already
normalised geometry: ``stride``, ``padding`` (explicit, symmetric) and
``dilation`` as lists of d ints, d = x.dim() - 2 in {1, 2, 3}.  Each op makes
its tensors contiguous and calls the backend with geometry as tuples of Python
ints::

    splora_conv_forward(x, weight, lora_a, lora_b, bias, in_idx, out_idx,
                        stride, padding, dilation, groups, scale) -> y
    splora_conv_backward(grad_out, x, weight, lora_a, lora_b, in_idx, out_idx,
                         stride, padding, dilation, groups, scale, output_mask)
        -> (dx, dweight, dlora_a, dlora_b, dbias), None where not asked for
    sppara_conv_forward(x, weight, adapter, bias, in_idx, out_idx,
                        stride, padding, dilation, groups) -> y
    sppara_conv_backward(grad_out, x, weight, adapter, in_idx, out_idx,
                         stride, padding, dilation, groups, output_mask)
        -> (dx, dweight, dadapter, dbias)

The arguments come in one order everywhere (op, backends, C++): tensors, then
geometry, then ``scale``, then ``backend`` and ``output_mask``.  Only backends
whose capabilities include grouped convolutions run ``groups != 1``; the ops
refuse it elsewhere.

``compact_input``/``compact_output`` (last in every schema, default False) make
dimension 1 of ``x``/``y`` (and of their gradients) hold the active channels
only; see ``linear.py`` for how backends without compact kernels are served.

The backward ops return empty placeholders for gradients not asked for, because
op schemas cannot return ``None``.
"""

from __future__ import annotations

from torch import Tensor

from .._geometry import conv_output_shape
from ..backend import check_groups
from .library import (
    call,
    compact_flags,
    compact_width,
    contiguous,
    define_op,
    factor,
    fake_gradients,
    gradient_shapes,
    refuse_derivative,
    register_autograd,
    register_fake,
    run_backward,
    run_forward,
    shaped_as,
    wanted,
    with_placeholders,
    zero_gradients,
)

# Explicit schemas: geometry is int[] (not SymInt[]), since it is fixed per layer.
_GEOMETRY = "int[] stride, int[] padding, int[] dilation, int groups"
_COMPACT = "bool compact_input=False, bool compact_output=False"
SPLORA_CONV_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor? lora_a, Tensor? lora_b, Tensor? bias, Tensor? in_idx, "
    f"Tensor? out_idx, {_GEOMETRY}, float scale, str backend, {_COMPACT}) -> Tensor"
)
SPLORA_CONV_BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor x, Tensor weight, Tensor? lora_a, Tensor? lora_b, Tensor? in_idx, "
    f"Tensor? out_idx, {_GEOMETRY}, float scale, str backend, bool[] output_mask, {_COMPACT}) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
SPPARA_CONV_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor adapter, Tensor? bias, Tensor? in_idx, Tensor? out_idx, "
    f"{_GEOMETRY}, str backend, {_COMPACT}) -> Tensor"
)
SPPARA_CONV_BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor x, Tensor weight, Tensor adapter, Tensor? in_idx, Tensor? out_idx, "
    f"{_GEOMETRY}, str backend, bool[] output_mask, {_COMPACT}) -> (Tensor, Tensor, Tensor, Tensor)"
)


def _geometry(stride, padding, dilation) -> tuple[tuple[int, ...], ...]:
    return tuple(map(int, stride)), tuple(map(int, padding)), tuple(map(int, dilation))


def _output_shape(x, weight, out_idx, stride, padding, dilation, compact_output) -> list:
    shape = conv_output_shape(x, weight, stride, padding, dilation)
    if compact_output:
        shape[1] = compact_width(out_idx, weight.shape[0])
    return shape


def _channels(weight: Tensor, groups: int) -> tuple[int, int]:
    """Full (input, output) channel counts of a convolution."""
    return weight.shape[1] * groups, weight.shape[0]


# --------------------------------------------------------------------------- SPLoRA


@define_op("splora_conv", schema=SPLORA_CONV_SCHEMA)
def splora_conv(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    bias: Tensor | None,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    scale: float,
    backend: str,
    compact_input: bool = False,
    compact_output: bool = False,
) -> Tensor:
    check_groups(backend, groups)
    if x.shape[0] == 0:
        return x.new_zeros(_output_shape(x, weight, out_idx, stride, padding, dilation, compact_output))
    operands = (weight.contiguous(), factor(lora_a), factor(lora_b), contiguous(bias), in_idx, out_idx,
                *_geometry(stride, padding, dilation), groups, scale)
    return run_forward(backend, "splora_conv_forward", x.contiguous(), operands, in_idx, out_idx,
                       _channels(weight, groups)[0], compact_input, compact_output)


@register_fake(splora_conv)
def _(x, weight, lora_a, lora_b, bias, in_idx, out_idx, stride, padding, dilation, groups, scale, backend,
      compact_input=False, compact_output=False):
    return x.new_empty(_output_shape(x, weight, out_idx, stride, padding, dilation, compact_output))


@define_op("splora_conv_backward", schema=SPLORA_CONV_BACKWARD_SCHEMA)
def splora_conv_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    scale: float,
    backend: str,
    output_mask: list[bool],
    compact_input: bool = False,
    compact_output: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_groups(backend, groups)
    mask = tuple(bool(m) for m in output_mask)
    if lora_a is None:
        mask = (mask[0], mask[1], False, False, mask[4])
    if x.shape[0] == 0:
        grads = zero_gradients(mask, gradient_shapes(x, weight, lora_a, lora_b, out_channels=weight.shape[0]), x)
    else:
        operands = (weight.contiguous(), factor(lora_a), factor(lora_b), in_idx, out_idx,
                    *_geometry(stride, padding, dilation), groups, scale, mask)
        grads = run_backward(backend, "splora_conv_backward", grad_out.contiguous(), x.contiguous(), operands,
                             in_idx, out_idx, *_channels(weight, groups), compact_input, compact_output)
        grads = (*grads[:2], shaped_as(grads[2], lora_a), shaped_as(grads[3], lora_b), grads[4])
    return with_placeholders(grads, x)


@register_fake(splora_conv_backward)
def _(grad_out, x, weight, lora_a, lora_b, in_idx, out_idx, stride, padding, dilation, groups, scale, backend,
      output_mask, compact_input=False, compact_output=False):
    return fake_gradients(output_mask, gradient_shapes(x, weight, lora_a, lora_b, out_channels=weight.shape[0]), x)


refuse_derivative(splora_conv_backward)


def _setup_splora_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, bias, in_idx, out_idx, stride, padding, dilation, groups, scale, backend, *compact = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, in_idx, out_idx)
    ctx.compact = compact_flags(compact)
    ctx.geometry = (stride, padding, dilation, groups)
    ctx.scale = scale
    ctx.backend = backend
    ctx.has_bias = bias is not None


def _splora_backward(ctx, grad_out):
    x, weight, lora_a, lora_b, in_idx, out_idx = ctx.saved_tensors
    need = ctx.needs_input_grad
    output_mask = [need[0], need[1], need[2], need[3], need[4] and ctx.has_bias]
    grads = call(
        splora_conv_backward, grad_out, x, weight, lora_a, lora_b, in_idx, out_idx, *ctx.geometry, ctx.scale,
        ctx.backend, output_mask, *ctx.compact,
    )
    return (*wanted(grads, output_mask), None, None, None, None, None, None, None, None, None, None)


register_autograd(splora_conv, _splora_backward, setup_context=_setup_splora_context)


# --------------------------------------------------------------------------- SPPaRA


@define_op("sppara_conv", schema=SPPARA_CONV_SCHEMA)
def sppara_conv(
    x: Tensor,
    weight: Tensor,
    adapter: Tensor,
    bias: Tensor | None,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    backend: str,
    compact_input: bool = False,
    compact_output: bool = False,
) -> Tensor:
    check_groups(backend, groups)
    if x.shape[0] == 0:
        return x.new_zeros(_output_shape(x, weight, out_idx, stride, padding, dilation, compact_output))
    operands = (weight.contiguous(), adapter.contiguous(), contiguous(bias), in_idx, out_idx,
                *_geometry(stride, padding, dilation), groups)
    return run_forward(backend, "sppara_conv_forward", x.contiguous(), operands, in_idx, out_idx,
                       _channels(weight, groups)[0], compact_input, compact_output)


@register_fake(sppara_conv)
def _(x, weight, adapter, bias, in_idx, out_idx, stride, padding, dilation, groups, backend, compact_input=False,
      compact_output=False):
    return x.new_empty(_output_shape(x, weight, out_idx, stride, padding, dilation, compact_output))


@define_op("sppara_conv_backward", schema=SPPARA_CONV_BACKWARD_SCHEMA)
def sppara_conv_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    adapter: Tensor,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    backend: str,
    output_mask: list[bool],
    compact_input: bool = False,
    compact_output: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_groups(backend, groups)
    mask = tuple(bool(m) for m in output_mask)
    if x.shape[0] == 0:
        grads = zero_gradients(mask, gradient_shapes(x, weight, adapter, out_channels=weight.shape[0]), x)
    else:
        operands = (weight.contiguous(), adapter.contiguous(), in_idx, out_idx,
                    *_geometry(stride, padding, dilation), groups, mask)
        grads = run_backward(backend, "sppara_conv_backward", grad_out.contiguous(), x.contiguous(), operands,
                             in_idx, out_idx, *_channels(weight, groups), compact_input, compact_output)
    return with_placeholders(grads, x)


@register_fake(sppara_conv_backward)
def _(grad_out, x, weight, adapter, in_idx, out_idx, stride, padding, dilation, groups, backend, output_mask,
      compact_input=False, compact_output=False):
    return fake_gradients(output_mask, gradient_shapes(x, weight, adapter, out_channels=weight.shape[0]), x)


refuse_derivative(sppara_conv_backward)


def _setup_sppara_context(ctx, inputs, output):
    x, weight, adapter, bias, in_idx, out_idx, stride, padding, dilation, groups, backend, *compact = inputs
    ctx.save_for_backward(x, weight, adapter, in_idx, out_idx)
    ctx.compact = compact_flags(compact)
    ctx.geometry = (stride, padding, dilation, groups)
    ctx.backend = backend
    ctx.has_bias = bias is not None


def _sppara_backward(ctx, grad_out):
    x, weight, adapter, in_idx, out_idx = ctx.saved_tensors
    need = ctx.needs_input_grad
    output_mask = [need[0], need[1], need[2], need[3] and ctx.has_bias]
    grads = call(
        sppara_conv_backward, grad_out, x, weight, adapter, in_idx, out_idx, *ctx.geometry, ctx.backend,
        output_mask, *ctx.compact,
    )
    return (*wanted(grads, output_mask), None, None, None, None, None, None, None, None, None)


register_autograd(sppara_conv, _sppara_backward, setup_context=_setup_sppara_context)


__all__ = ["splora_conv", "splora_conv_backward", "sppara_conv", "sppara_conv_backward"]
