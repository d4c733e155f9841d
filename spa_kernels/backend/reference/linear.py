"""Masked SPLoRA linear in plain PyTorch, forward and explicit backward.

Works on the active block only (index_select of the active rows and columns),
then scatters the active outputs into a zero tensor of full width.  This is the
oracle the other backends are tested against; clarity comes before speed.

Shapes: x (M, in), weight (out, in), lora_a (r, in), lora_b (out, r),
bias (out,), in_idx (|S|,), out_idx (|O|,) int64 or None (all active).
With ``compact_input`` x (and its gradient) is (M, |S|), already the active
columns; with ``compact_output`` y (and grad_out) is (M, |O|), never scattered.
"""

from __future__ import annotations

from torch import Tensor


def _take(t: Tensor, dim: int, idx: Tensor | None) -> Tensor:
    return t if idx is None else t.index_select(dim, idx)


def _scatter(active: Tensor, dim: int, idx: Tensor | None, width: int) -> Tensor:
    """Place ``active`` at positions ``idx`` of a zero tensor ``width`` wide on ``dim``."""
    if idx is None:
        return active
    shape = list(active.shape)
    shape[dim] = width
    full = active.new_zeros(shape)
    return full.index_copy_(dim, idx, active)


def splora_linear_forward(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    bias: Tensor | None,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    scale: float,
    *,
    compact_input: bool = False,
    compact_output: bool = False,
) -> Tensor:
    x_s = x if compact_input else _take(x, 1, in_idx)
    w_os = _take(_take(weight, 0, out_idx), 1, in_idx)
    y_o = x_s @ w_os.t()
    if lora_a is not None:
        t = x_s @ _take(lora_a, 1, in_idx).t()  # (M, r): the rank-r product
        y_o = y_o + scale * (t @ _take(lora_b, 0, out_idx).t())
    if bias is not None:
        y_o = y_o + _take(bias, 0, out_idx)
    return y_o if compact_output else _scatter(y_o, 1, out_idx, weight.shape[0])


def splora_linear_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    scale: float,
    output_mask: tuple[bool, bool, bool, bool, bool],
    *,
    compact_input: bool = False,
    compact_output: bool = False,
) -> tuple[Tensor | None, ...]:
    """Gradients of (x, weight, lora_a, lora_b, bias); ``None`` where not asked for."""
    need_x, need_w, need_a, need_b, need_bias = output_mask
    out_features, in_features = weight.shape
    dy_o = grad_out if compact_output else _take(grad_out, 1, out_idx)
    x_s = x if compact_input else _take(x, 1, in_idx)
    w_os = _take(_take(weight, 0, out_idx), 1, in_idx)
    a_s = _take(lora_a, 1, in_idx) if lora_a is not None else None
    b_o = _take(lora_b, 0, out_idx) if lora_b is not None else None

    grad_x = grad_w = grad_a = grad_b = grad_bias = None
    if need_x:
        dx_s = dy_o @ w_os
        if a_s is not None:
            dx_s = dx_s + scale * ((dy_o @ b_o) @ a_s)
        grad_x = dx_s if compact_input else _scatter(dx_s, 1, in_idx, in_features)
    if need_w:
        grad_w = _scatter(_scatter(dy_o.t() @ x_s, 1, in_idx, in_features), 0, out_idx, out_features)
    if need_a and a_s is not None:
        grad_a = _scatter(scale * ((dy_o @ b_o).t() @ x_s), 1, in_idx, in_features)
    if need_b and b_o is not None:
        grad_b = _scatter(scale * (dy_o.t() @ (x_s @ a_s.t())), 0, out_idx, out_features)
    if need_bias:
        grad_bias = _scatter(dy_o.sum(0), 0, out_idx, out_features)
    return grad_x, grad_w, grad_a, grad_b, grad_bias
