"""The linear op family: schema, fake kernel and autograd of ``splora_linear``.

The ops take an already-resolved backend name; the functional layer validates
the arguments and picks the backend.  Each op flattens leading dimensions and
hands 2-D contiguous tensors to the backend, so backends never see strides.

With ``compact_input`` the channel dimension of ``x`` (and of its gradient)
holds the active inputs only, in order; with ``compact_output`` that of ``y``
(and of ``grad_out``) holds the active outputs only.  Backends whose
capabilities include compact activations get the two flags as keywords; for
the others the op widens the compact tensors to full width with zeros before
the kernel and narrows its results after.

``lora_a`` and ``lora_b`` are ``(r, in)`` and ``(out, r)``, or ``(1, r, in)`` and
``(1, out, r)`` as modules hold them (``library.factor``); backends always get them
2-D, and their gradients come back in the shape given.

``splora_linear_backward`` returns five tensors (x, weight, lora_a, lora_b,
bias gradients); a gradient that was not asked for comes back as an empty
placeholder, because op schemas cannot return ``None``.
"""

from __future__ import annotations

from torch import Tensor

from .library import (
    as_matrix,
    call,
    compact_flags,
    compact_width,
    contiguous,
    define_op,
    factor,
    fake_gradients,
    gradient_shapes,
    own_storage,
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
    compact_input: bool = False,
    compact_output: bool = False,
) -> Tensor:
    out_features, in_features = weight.shape
    y_width = compact_width(out_idx, out_features) if compact_output else out_features
    lead = x.shape[:-1]
    x2d = as_matrix(x, x.shape[-1])
    if x2d.shape[0] == 0:
        return x.new_zeros(*lead, y_width)
    operands = (weight.contiguous(), factor(lora_a), factor(lora_b), contiguous(bias), in_idx, out_idx, scale)
    y = run_forward(backend, "splora_linear_forward", x2d, operands, in_idx, out_idx, in_features,
                    compact_input, compact_output)
    return own_storage(y.contiguous(), (*lead, y_width))


@register_fake(splora_linear)
def _(x, weight, lora_a, lora_b, bias, in_idx, out_idx, scale, backend, compact_input=False, compact_output=False):
    y_width = compact_width(out_idx, weight.shape[0]) if compact_output else weight.shape[0]
    return x.new_empty(*x.shape[:-1], y_width)


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
    compact_input: bool = False,
    compact_output: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    out_features, in_features = weight.shape
    x2d = as_matrix(x, x.shape[-1])
    grad2d = as_matrix(grad_out, grad_out.shape[-1])
    mask = tuple(bool(m) for m in output_mask)
    if lora_a is None:
        mask = (mask[0], mask[1], False, False, mask[4])
    if x2d.shape[0] == 0:
        grads = zero_gradients(mask, gradient_shapes(x2d, weight, lora_a, lora_b, out_channels=out_features), x2d)
    else:
        operands = (weight.contiguous(), factor(lora_a), factor(lora_b), in_idx, out_idx, scale, mask)
        grads = run_backward(backend, "splora_linear_backward", grad2d, x2d, operands, in_idx, out_idx, in_features,
                             out_features, compact_input, compact_output)
        grads = (*grads[:2], shaped_as(grads[2], lora_a), shaped_as(grads[3], lora_b), grads[4])
    grad_x = own_storage(grads[0].contiguous(), tuple(x.shape)) if grads[0] is not None else None
    return with_placeholders((grad_x, *grads[1:]), x)


@register_fake(splora_linear_backward)
def _(grad_out, x, weight, lora_a, lora_b, in_idx, out_idx, scale, backend, output_mask, compact_input=False,
      compact_output=False):
    return fake_gradients(output_mask, gradient_shapes(x, weight, lora_a, lora_b, out_channels=weight.shape[0]), x)


refuse_derivative(splora_linear_backward)


def _setup_linear_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, bias, in_idx, out_idx, scale, backend, *compact = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, in_idx, out_idx)
    ctx.scale = scale
    ctx.backend = backend
    ctx.has_bias = bias is not None
    ctx.compact = compact_flags(compact)


def _linear_backward(ctx, grad_out):
    x, weight, lora_a, lora_b, in_idx, out_idx = ctx.saved_tensors
    need = ctx.needs_input_grad
    output_mask = [need[0], need[1], need[2], need[3], need[4] and ctx.has_bias]
    grads = call(
        splora_linear_backward, grad_out, x, weight, lora_a, lora_b, in_idx, out_idx, ctx.scale, ctx.backend,
        output_mask, *ctx.compact,
    )
    return (*wanted(grads, output_mask), None, None, None, None, None, None)


register_autograd(splora_linear, _linear_backward, setup_context=_setup_linear_context)


__all__ = ["splora_linear", "splora_linear_backward"]
