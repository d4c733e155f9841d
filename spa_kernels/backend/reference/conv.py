"""Masked SPLoRA and SPPaRA convolutions in plain PyTorch, forward and explicit backward.

The adapter sits at the kernel's centre tap.  With ``c`` the centre index,

    W_eff[o, i, c] = W[o, i, c] + s·(B A)[o, i]      (SPLoRA)
    W_eff[o, i, c] = W[o, i, c] + P[o, i]            (SPPaRA)

and every other tap is ``W``.  For ``groups == 1`` this module works on the
active block only: it gathers the active input channels of ``x`` and the active
``(O, S)`` block of the weight, adds the adapter at the centre tap of that
block, runs the PyTorch convolution and scatters the active outputs into a zero
tensor of full width.  The backward uses ``torch.nn.grad.conv*d_input`` and
``conv*d_weight`` on the same block; the adapter gradients use the *centre-tap
input* ``x_c`` (what the centre tap multiplies, see :func:`centre_tap_input`),
so that ``dB = s·dy_O x_cᵀ Aᵀ`` and ``dA = s·(B_Oᵀ dy_O) x_cᵀ`` stay rank-r.

Grouped convolutions (``groups > 1``, depthwise included) run on the
reference backend only, in a simpler masked form: see ``conv_grouped.py``.

Shapes: x (N, C_in, *spatial), weight (C_out, C_in/groups, *kernel),
lora_a (r, C_in/groups), lora_b (C_out, r), adapter (C_out, C_in/groups),
bias (C_out,), in_idx (|S|,) and out_idx (|O|,) int64 or None (all active);
stride, padding (explicit, symmetric), dilation: tuples of d ints.
With ``compact_input`` x (and its gradient) is (N, |S|, *spatial), already the
active channels; with ``compact_output`` y (and grad_out) is (N, |O|, ...),
never scattered.  Grouped convolutions widen compact tensors around the grouped
path, which works on full-width tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._geometry import conv_output_spatial
from . import conv_grouped
from .linear import _scatter, _take
from .torch_conv import CONV, CONV_INPUT_GRAD, CONV_WEIGHT_GRAD, Geometry, broadcast, centre_tap


def centre_tap_input(
    x: Tensor, kernel: Geometry, stride: Geometry, padding: Geometry, dilation: Geometry, out_spatial: list[int]
) -> Tensor:
    """What the centre tap multiplies: ``x[p·stride + c·dilation − padding]`` (zero outside x).

    Shape ``(N, C, *out_spatial)``.  The centre term of the convolution is a
    1×1 convolution over this tensor, which is why it equals a parallel 1×1
    convolution with the same stride.
    """
    shift = [pad - (k // 2) * dil for k, pad, dil in zip(kernel, padding, dilation, strict=True)]
    pads = []
    for s in reversed(shift):  # F.pad lists the last dimension first; negative pads crop
        pads += [s, s]
    shifted = F.pad(x, pads)
    return shifted[(slice(None), slice(None), *(slice(0, n * st, st) for n, st in zip(out_spatial, stride, strict=True)))]


# --------------------------------------------------------------------------- groups == 1: active block


def _active_effective_weight(weight, centre_os, in_idx, out_idx) -> Tensor:
    """``W_OS`` with ``centre_os`` added at the centre tap: the active block only, never full size."""
    w_eff = _take(_take(weight, 0, out_idx), 1, in_idx).clone()
    if centre_os is not None:
        w_eff[centre_tap(w_eff)] += centre_os
    return w_eff


def _active_forward(x, weight, centre_os, bias, in_idx, out_idx, stride, padding, dilation,
                    compact_input=False, compact_output=False) -> Tensor:
    """``y`` for groups 1 from the active block; ``centre_os`` (|O|, |S|) is the centre-tap adapter term."""
    d = x.dim() - 2
    out_channels = weight.shape[0]
    n_in = x.shape[1] if in_idx is None or compact_input else in_idx.numel()
    n_out = out_channels if out_idx is None else out_idx.numel()
    out_shape = [x.shape[0], n_out if compact_output else out_channels,
                 *conv_output_spatial(x, weight, stride, padding, dilation)]
    if n_out == 0:
        return x.new_zeros(out_shape)
    bias_o = _take(bias, 0, out_idx) if bias is not None else None
    if n_in == 0:  # every input pruned: only the bias of the active outputs remains
        y_o = x.new_zeros([out_shape[0], n_out, *out_shape[2:]])
        if bias_o is not None:
            y_o += broadcast(bias_o, y_o.dim(), 1)
    else:
        w_eff = _active_effective_weight(weight, centre_os, in_idx, out_idx)
        x_s = x if compact_input else _take(x, 1, in_idx)
        y_o = CONV[d](x_s, w_eff, bias_o, stride, padding, dilation)
    return y_o if compact_output else _scatter(y_o, 1, out_idx, out_channels)


def _active_backward(grad_out, x, weight, centre_os, in_idx, out_idx, stride, padding, dilation, need_x, need_w,
                     need_centre_input, compact_input=False, compact_output=False):
    """Gradients of x and W for groups 1, plus ``dy_O`` and ``x_c`` (centre-tap input) for the adapters.

    Returns ``(grad_x, grad_w, dy_o, x_c)``; ``x_c`` is None when not asked for
    or when a channel set is empty (then the adapter term is identically zero).
    """
    d = x.dim() - 2
    out_channels, in_channels = weight.shape[0], weight.shape[1]
    dy_o = grad_out if compact_output else _take(grad_out, 1, out_idx)
    n_in = x.shape[1] if in_idx is None or compact_input else in_idx.numel()
    grad_x = grad_w = x_c = None
    if n_in == 0 or dy_o.shape[1] == 0:  # nothing flows between the active sets
        grad_x = torch.zeros_like(x) if need_x else None
        grad_w = torch.zeros_like(weight) if need_w else None
        return grad_x, grad_w, dy_o, x_c
    x_s = x if compact_input else _take(x, 1, in_idx)
    if need_x:
        w_eff = _active_effective_weight(weight, centre_os, in_idx, out_idx)
        dx_s = CONV_INPUT_GRAD[d](x_s.shape, w_eff, dy_o, stride, padding, dilation)
        grad_x = dx_s if compact_input else _scatter(dx_s, 1, in_idx, in_channels)
    if need_w:
        block_shape = (dy_o.shape[1], x_s.shape[1], *weight.shape[2:])
        dw_os = CONV_WEIGHT_GRAD[d](x_s, block_shape, dy_o, stride, padding, dilation)
        grad_w = _scatter(_scatter(dw_os, 1, in_idx, in_channels), 0, out_idx, out_channels)
    if need_centre_input:
        x_c = centre_tap_input(x_s, tuple(weight.shape[2:]), stride, padding, dilation, list(dy_o.shape[2:]))
    return grad_x, grad_w, dy_o, x_c


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Adapter gradients reduce over every batch and spatial position: fp32 for 16-bit inputs."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _positions_last(t: Tensor, dtype: torch.dtype) -> Tensor:
    """(N, C, *spatial) as (C, N·P) in ``dtype``: one GEMM then reduces over batch and space."""
    return t.transpose(0, 1).reshape(t.shape[1], -1).to(dtype)


def _bias_grad(dy_o: Tensor, out_idx: Tensor | None, out_channels: int) -> Tensor:
    dims = [0, *range(2, dy_o.dim())]
    return _scatter(dy_o.sum(dims), 0, out_idx, out_channels)


def _full_width(t: Tensor, idx: Tensor | None, channels: int, compact: bool) -> Tensor:
    """A compact activation widened to ``channels`` with zeros, for the grouped path."""
    return _scatter(t, 1, idx, channels) if compact else t


def _compact_grad_x(grads: tuple, in_idx: Tensor | None, compact_input: bool) -> tuple:
    if not compact_input or grads[0] is None:
        return grads
    return (_take(grads[0], 1, in_idx), *grads[1:])


# --------------------------------------------------------------------------- SPLoRA


def splora_conv_forward(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    bias: Tensor | None,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    stride: Geometry,
    padding: Geometry,
    dilation: Geometry,
    groups: int,
    scale: float,
    *,
    compact_input: bool = False,
    compact_output: bool = False,
) -> Tensor:
    if groups != 1:
        x = _full_width(x, in_idx, weight.shape[1] * groups, compact_input)
        y = conv_grouped.splora_conv_forward(x, weight, lora_a, lora_b, bias, in_idx, out_idx, stride, padding,
                                             dilation, groups, scale)
        return _take(y, 1, out_idx) if compact_output else y
    centre_os = None
    if lora_a is not None:  # s·B_O A_S: the active block of the adapter, never the full (out, in) product
        centre_os = scale * (_take(lora_b, 0, out_idx) @ _take(lora_a, 1, in_idx))
    return _active_forward(x, weight, centre_os, bias, in_idx, out_idx, stride, padding, dilation,
                           compact_input, compact_output)


def splora_conv_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    stride: Geometry,
    padding: Geometry,
    dilation: Geometry,
    groups: int,
    scale: float,
    output_mask: tuple[bool, bool, bool, bool, bool],
    *,
    compact_input: bool = False,
    compact_output: bool = False,
) -> tuple[Tensor | None, ...]:
    """Gradients of (x, weight, lora_a, lora_b, bias); ``None`` where not asked for."""
    need_x, need_w, need_a, need_b, need_bias = output_mask
    has_lora = lora_a is not None
    need_a, need_b = need_a and has_lora, need_b and has_lora
    if groups != 1:
        grads = conv_grouped.splora_conv_backward(
            _full_width(grad_out, out_idx, weight.shape[0], compact_output),
            _full_width(x, in_idx, weight.shape[1] * groups, compact_input),
            weight, lora_a, lora_b, in_idx, out_idx, stride, padding, dilation, groups, scale, output_mask,
        )
        return _compact_grad_x(grads, in_idx, compact_input)
    out_channels = weight.shape[0]
    a_s = _take(lora_a, 1, in_idx) if has_lora else None
    b_o = _take(lora_b, 0, out_idx) if has_lora else None
    centre_os = scale * (b_o @ a_s) if has_lora else None
    grad_x, grad_w, dy_o, x_c = _active_backward(
        grad_out, x, weight, centre_os, in_idx, out_idx, stride, padding, dilation, need_x, need_w, need_a or need_b,
        compact_input, compact_output,
    )
    grad_a = grad_b = grad_bias = None
    if x_c is None:  # not asked for, or an empty channel set (the adapter term is then zero)
        grad_a = torch.zeros_like(lora_a) if need_a else None
        grad_b = torch.zeros_like(lora_b) if need_b else None
    else:
        acc = _accumulation_dtype(x.dtype)
        dy_flat, x_c_flat = _positions_last(dy_o, acc), _positions_last(x_c, acc)  # (|O|, N·P), (|S|, N·P)
        if need_a:
            u = b_o.to(acc).t() @ dy_flat  # (r, N·P): dy_O through B_O
            grad_a = _scatter((scale * (u @ x_c_flat.t())).to(x.dtype), 1, in_idx, lora_a.shape[1])
        if need_b:
            t = a_s.to(acc) @ x_c_flat  # (r, N·P): the rank-r product A_S x_c
            grad_b = _scatter((scale * (dy_flat @ t.t())).to(x.dtype), 0, out_idx, out_channels)
    if need_bias:
        grad_bias = _bias_grad(dy_o, out_idx, out_channels)
    return grad_x, grad_w, grad_a, grad_b, grad_bias


# --------------------------------------------------------------------------- SPPaRA


def sppara_conv_forward(
    x: Tensor,
    weight: Tensor,
    adapter: Tensor,
    bias: Tensor | None,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    stride: Geometry,
    padding: Geometry,
    dilation: Geometry,
    groups: int,
    *,
    compact_input: bool = False,
    compact_output: bool = False,
) -> Tensor:
    if groups != 1:
        x = _full_width(x, in_idx, weight.shape[1] * groups, compact_input)
        y = conv_grouped.sppara_conv_forward(x, weight, adapter, bias, in_idx, out_idx, stride, padding, dilation,
                                             groups)
        return _take(y, 1, out_idx) if compact_output else y
    centre_os = _take(_take(adapter, 0, out_idx), 1, in_idx)
    return _active_forward(x, weight, centre_os, bias, in_idx, out_idx, stride, padding, dilation,
                           compact_input, compact_output)


def sppara_conv_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    adapter: Tensor,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    stride: Geometry,
    padding: Geometry,
    dilation: Geometry,
    groups: int,
    output_mask: tuple[bool, bool, bool, bool],
    *,
    compact_input: bool = False,
    compact_output: bool = False,
) -> tuple[Tensor | None, ...]:
    """Gradients of (x, weight, adapter, bias); ``None`` where not asked for."""
    need_x, need_w, need_p, need_bias = output_mask
    if groups != 1:
        grads = conv_grouped.sppara_conv_backward(
            _full_width(grad_out, out_idx, weight.shape[0], compact_output),
            _full_width(x, in_idx, weight.shape[1] * groups, compact_input),
            weight, adapter, in_idx, out_idx, stride, padding, dilation, groups, output_mask,
        )
        return _compact_grad_x(grads, in_idx, compact_input)
    out_channels = weight.shape[0]
    centre_os = _take(_take(adapter, 0, out_idx), 1, in_idx)
    grad_x, grad_w, dy_o, x_c = _active_backward(
        grad_out, x, weight, centre_os, in_idx, out_idx, stride, padding, dilation, need_x, need_w, need_p,
        compact_input, compact_output,
    )
    grad_p = grad_bias = None
    if need_p:
        if x_c is None:
            grad_p = torch.zeros_like(adapter)
        else:  # the centre-tap weight gradient of the active block: Σ dy_O x_cᵀ
            acc = _accumulation_dtype(x.dtype)
            dp_os = (_positions_last(dy_o, acc) @ _positions_last(x_c, acc).t()).to(x.dtype)
            grad_p = _scatter(_scatter(dp_os, 1, in_idx, adapter.shape[1]), 0, out_idx, out_channels)
    if need_bias:
        grad_bias = _bias_grad(dy_o, out_idx, out_channels)
    return grad_x, grad_w, grad_p, grad_bias

