"""The block-SPA (SPLoPA) op family: schema, fake kernel and autograd of ``splopa_linear``.

The ops take an already-resolved backend name; the functional layer validates
the arguments and picks the backend.  Leading dimensions of ``x`` are flattened
and backends receive 2-D contiguous tensors.

``splopa_linear_backward`` returns six tensors, the gradients of (x, weight,
prototype_rows, prototype_cols, pos_weights, bias); one not asked for comes back
as an empty placeholder, because op schemas cannot return ``None``.
"""

from __future__ import annotations

from torch import Tensor

from ..backend import kernel
from .library import (
    as_matrix,
    call,
    contiguous,
    define_op,
    fake_gradients,
    gradient_shapes,
    own_storage,
    refuse_derivative,
    register_autograd,
    register_fake,
    wanted,
    with_placeholders,
    zero_gradients,
)

# --------------------------------------------------------------------------- forward


@define_op("splopa_linear")
def splopa_linear(
    x: Tensor,
    weight: Tensor,
    prototype_rows: Tensor,
    prototype_cols: Tensor,
    pos_weights: Tensor,
    bias: Tensor | None,
    block_mask: Tensor | None,
    scale: float,
    backend: str,
) -> Tensor:
    out_features, in_features = weight.shape
    lead = x.shape[:-1]
    x2d = as_matrix(x, in_features)
    if x2d.shape[0] == 0:
        return x.new_zeros(*lead, out_features)
    y = kernel(backend, "splopa_linear_forward")(
        x2d, weight.contiguous(), prototype_rows.contiguous(), prototype_cols.contiguous(),
        pos_weights.contiguous(), contiguous(bias), contiguous(block_mask), scale,
    )
    return own_storage(y, (*lead, out_features))


@register_fake(splopa_linear)
def _(x, weight, prototype_rows, prototype_cols, pos_weights, bias, block_mask, scale, backend):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# --------------------------------------------------------------------------- backward


@define_op("splopa_linear_backward")
def splopa_linear_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    prototype_rows: Tensor,
    prototype_cols: Tensor,
    pos_weights: Tensor,
    block_mask: Tensor | None,
    scale: float,
    backend: str,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    out_features, in_features = weight.shape
    x2d = as_matrix(x, in_features)
    grad2d = as_matrix(grad_out, out_features)
    mask = tuple(bool(m) for m in output_mask)
    if x2d.shape[0] == 0:
        shapes = gradient_shapes(x2d, weight, prototype_rows, prototype_cols, pos_weights, out_channels=out_features)
        grads = zero_gradients(mask, shapes, x2d)
    else:
        grads = kernel(backend, "splopa_linear_backward")(
            grad2d, x2d, weight.contiguous(), prototype_rows.contiguous(), prototype_cols.contiguous(),
            pos_weights.contiguous(), contiguous(block_mask), scale, mask,
        )
    grad_x = own_storage(grads[0].contiguous(), tuple(x.shape)) if grads[0] is not None else None
    return with_placeholders((grad_x, *grads[1:]), x)


@register_fake(splopa_linear_backward)
def _(grad_out, x, weight, prototype_rows, prototype_cols, pos_weights, block_mask, scale, backend, output_mask):
    shapes = gradient_shapes(x, weight, prototype_rows, prototype_cols, pos_weights, out_channels=weight.shape[0])
    return fake_gradients(output_mask, shapes, x)


refuse_derivative(splopa_linear_backward)


def _setup_splopa_context(ctx, inputs, output):
    x, weight, prototype_rows, prototype_cols, pos_weights, bias, block_mask, scale, backend = inputs
    ctx.save_for_backward(x, weight, prototype_rows, prototype_cols, pos_weights, block_mask)
    ctx.scale = scale
    ctx.backend = backend
    ctx.has_bias = bias is not None


def _splopa_backward(ctx, grad_out):
    x, weight, prototype_rows, prototype_cols, pos_weights, block_mask = ctx.saved_tensors
    need = ctx.needs_input_grad
    output_mask = [need[0], need[1], need[2], need[3], need[4], need[5] and ctx.has_bias]
    grads = call(
        splopa_linear_backward, grad_out, x, weight, prototype_rows, prototype_cols, pos_weights, block_mask,
        ctx.scale, ctx.backend,
        output_mask,
    )
    return (*wanted(grads, output_mask), None, None, None)


register_autograd(splopa_linear, _splopa_backward, setup_context=_setup_splopa_context)


__all__ = ["splopa_linear", "splopa_linear_backward"]
