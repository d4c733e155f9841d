"""Every op of spa_kernels: schema, fake kernel and autograd.

The linear ops are here; the convolution ops (``splora_conv``, ``sppara_conv``
and their backward ops) are in ``_ops_conv.py``, imported at the bottom.

The ops take an already-resolved backend name; the functional layer validates
the arguments and picks the backend.  Each op flattens leading dimensions and
hands 2-D contiguous tensors to the backend, so backends never see strides.

``splora_linear_backward`` returns five tensors (x, weight, lora_a, lora_b,
bias gradients); a gradient that was not asked for comes back as an empty
placeholder, because op schemas cannot return ``None``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend
from ._dispatch import define_op, refuse_derivative, register_autograd, register_fake


def _empty_like_missing(t: Tensor | None, ref: Tensor) -> Tensor:
    return t if t is not None else ref.new_empty(0)


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


# --------------------------------------------------------------------------- forward


@define_op("splora_linear")
def splora_linear(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    bias: Tensor | None,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    scale: float,
    backend: str,
) -> Tensor:
    out_features, in_features = weight.shape
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features).contiguous()
    if x2d.shape[0] == 0:
        return x.new_zeros(*lead, out_features)
    y = _backend.get(backend).splora_linear_forward(
        x2d, weight.contiguous(), _contiguous(lora_a), _contiguous(lora_b),
        _contiguous(bias), in_idx, out_idx, scale,
    )
    return _own_storage(y, (*lead, out_features))


def _own_storage(y: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``y`` (contiguous) reshaped to ``shape`` as a tensor of its own, not a view.

    An op's output must not be a view: autograd forbids in-place changes to views
    made inside a custom function (``nn.ReLU(inplace=True)`` after the layer would
    fail).  Pointing a fresh tensor at ``y``'s storage reshapes without a copy.
    """
    if y.shape == shape and not y._is_view():
        return y
    return y.new_empty(0).set_(y.untyped_storage(), y.storage_offset(), shape, torch.empty(shape, device="meta").stride())


@register_fake(splora_linear)
def _(x, weight, lora_a, lora_b, bias, in_idx, out_idx, scale, backend):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# --------------------------------------------------------------------------- backward


@define_op("splora_linear_backward")
def splora_linear_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    scale: float,
    backend: str,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    out_features, in_features = weight.shape
    x2d = x.reshape(-1, in_features).contiguous()
    grad2d = grad_out.reshape(-1, out_features).contiguous()
    mask = tuple(bool(m) for m in output_mask)
    if lora_a is None:
        mask = (mask[0], mask[1], False, False, mask[4])
    if x2d.shape[0] == 0:
        grads = (
            x2d.new_zeros(x2d.shape) if mask[0] else None,
            torch.zeros_like(weight) if mask[1] else None,
            torch.zeros_like(lora_a) if mask[2] else None,
            torch.zeros_like(lora_b) if mask[3] else None,
            weight.new_zeros(out_features) if mask[4] else None,
        )
    else:
        grads = _backend.get(backend).splora_linear_backward(
            grad2d, x2d, weight.contiguous(), _contiguous(lora_a), _contiguous(lora_b),
            in_idx, out_idx, scale, mask,
        )
    grad_x = _own_storage(grads[0].contiguous(), tuple(x.shape)) if grads[0] is not None else None
    return (
        _empty_like_missing(grad_x, x),
        _empty_like_missing(grads[1], x),
        _empty_like_missing(grads[2], x),
        _empty_like_missing(grads[3], x),
        _empty_like_missing(grads[4], x),
    )


@register_fake(splora_linear_backward)
def _(grad_out, x, weight, lora_a, lora_b, in_idx, out_idx, scale, backend, output_mask):
    has_lora = lora_a is not None
    shapes = (
        x.shape,
        weight.shape,
        lora_a.shape if has_lora else None,
        lora_b.shape if has_lora else None,
        weight.shape[:1],
    )
    return tuple(
        x.new_empty(shape) if want and shape is not None else x.new_empty(0)
        for want, shape in zip(output_mask, shapes, strict=True)
    )


refuse_derivative(splora_linear_backward)


def _setup_linear_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, bias, in_idx, out_idx, scale, backend = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, in_idx, out_idx)
    ctx.scale = scale
    ctx.backend = backend
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad_out):
    x, weight, lora_a, lora_b, in_idx, out_idx = ctx.saved_tensors
    need = ctx.needs_input_grad
    output_mask = [need[0], need[1], need[2], need[3], need[4] and ctx.has_bias]
    grads = splora_linear_backward(
        grad_out, x, weight, lora_a, lora_b, in_idx, out_idx, ctx.scale, ctx.backend, output_mask
    )
    grads = [g if want else None for g, want in zip(grads, output_mask, strict=True)]
    return (*grads, None, None, None, None)


register_autograd(splora_linear, _linear_backward, setup_context=_setup_linear_context)


# The convolution ops live in their own file; importing it registers them.
from ._ops_conv import (  # noqa: E402
    splora_conv,
    splora_conv_backward,
    sppara_conv,
    sppara_conv_backward,
)

__all__ = [
    "splora_conv",
    "splora_conv_backward",
    "splora_linear",
    "splora_linear_backward",
    "sppara_conv",
    "sppara_conv_backward",
]
