"""Grouped and depthwise SPLoRA / SPPaRA convolutions in plain PyTorch (``groups > 1``).

Only the reference backend runs these, in a simple masked form rather than on
the active block: ``x`` is zeroed at pruned input channels, and the effective
weight at every entry whose output channel or input channel is pruned.  Input
channel ``i`` of group ``g`` is channel ``g·C_in/groups + i`` of ``x``, and the
adapter ``(C_out, C_in/groups)`` is added at the centre tap of every group
exactly like ``sp_adapters``' ``adapted_weight``.  So a pruned input channel
contributes nothing; column ``i`` of ``A`` (or ``P``) gets a gradient from the
groups in which channel ``g·C_in/groups + i`` is active, and is exactly zero
when that channel is pruned in every group.  Pruned entries are replaced with
``torch.where``, so they are never read (NaN there is harmless).

The entry points have the signatures of the ``groups == 1`` ones in ``conv.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .torch_conv import CONV, CONV_INPUT_GRAD, CONV_WEIGHT_GRAD, Geometry, broadcast, centre_tap


def _index_mask(idx: Tensor | None, size: int, device: torch.device) -> Tensor:
    mask = torch.ones(size, dtype=torch.bool, device=device)
    if idx is not None:
        mask = torch.zeros_like(mask).index_fill_(0, idx, True)
    return mask


def _group_masks(x: Tensor, weight: Tensor, in_idx, out_idx, groups: int):
    """Bool masks: input channels of x, output channels, and active (C_out, C_in/groups) weight entries."""
    out_channels, group_in = weight.shape[0], weight.shape[1]
    in_mask = _index_mask(in_idx, x.shape[1], x.device)
    out_mask = _index_mask(out_idx, out_channels, x.device)
    # Row o of the weight reads the input channels of its group, g = o // (C_out/groups).
    in_of_row = in_mask.view(groups, 1, group_in).expand(groups, out_channels // groups, group_in)
    entry_mask = in_of_row.reshape(out_channels, group_in) & out_mask[:, None]
    return in_mask, out_mask, entry_mask


def _grouped_effective_weight(weight: Tensor, centre: Tensor | None, entry_mask: Tensor) -> Tensor:
    w_eff = weight.clone()
    if centre is not None:
        w_eff[centre_tap(w_eff)] += centre
    return torch.where(entry_mask.view(*entry_mask.shape, *[1] * (weight.dim() - 2)), w_eff, 0)


def _grouped_adapter_columns(in_mask: Tensor, groups: int) -> Tensor:
    """Columns of A (or P) whose input channel is active in at least one group."""
    return in_mask.view(groups, -1).any(0)


# ``centre_fn(in_mask, out_mask)`` builds the (C_out, C_in/groups) centre-tap adapter
# term from the adapter with its pruned rows and columns replaced by zeros (never
# read); None for the plain masked convolution.


def _grouped_forward(x, weight, centre_fn, bias, in_idx, out_idx, stride, padding, dilation, groups):
    d = x.dim() - 2
    in_mask, out_mask, entry_mask = _group_masks(x, weight, in_idx, out_idx, groups)
    x_m = torch.where(broadcast(in_mask, x.dim(), 1), x, 0)
    centre = None if centre_fn is None else centre_fn(in_mask, out_mask)
    w_eff = _grouped_effective_weight(weight, centre, entry_mask)
    bias_m = None if bias is None else torch.where(out_mask, bias, 0)
    return CONV[d](x_m, w_eff, bias_m, stride, padding, dilation, groups)


def _grouped_backward(grad_out, x, weight, centre_fn, in_idx, out_idx, stride, padding, dilation, groups,
                      need_x, need_w, need_centre):
    """Returns ``(grad_x, grad_w, grad_centre, grad_bias_full, masks)``.

    ``grad_centre`` is the (C_out, C_in/groups) gradient of the centre tap of
    the effective weight, from which the adapter gradients follow.
    """
    d = x.dim() - 2
    in_mask, out_mask, entry_mask = _group_masks(x, weight, in_idx, out_idx, groups)
    dy_m = torch.where(broadcast(out_mask, grad_out.dim(), 1), grad_out, 0)
    grad_x = grad_w = grad_centre = None
    if need_x:
        centre = None if centre_fn is None else centre_fn(in_mask, out_mask)
        w_eff = _grouped_effective_weight(weight, centre, entry_mask)
        dx = CONV_INPUT_GRAD[d](x.shape, w_eff, dy_m, stride, padding, dilation, groups)
        grad_x = torch.where(broadcast(in_mask, x.dim(), 1), dx, 0)
    if need_w or need_centre:
        x_m = torch.where(broadcast(in_mask, x.dim(), 1), x, 0)
        dw = CONV_WEIGHT_GRAD[d](x_m, weight.shape, dy_m, stride, padding, dilation, groups)
        dw = torch.where(entry_mask.view(*entry_mask.shape, *[1] * d), dw, 0)
        grad_w = dw if need_w else None
        grad_centre = dw[centre_tap(dw)].clone()  # a return must not alias grad_w
    grad_bias = dy_m.sum([0, *range(2, dy_m.dim())])
    return grad_x, grad_w, grad_centre, grad_bias, (in_mask, out_mask)


def _splora_masked_factors(lora_a: Tensor, lora_b: Tensor, in_mask: Tensor, out_mask: Tensor, groups: int):
    """A and B with their pruned columns / rows replaced by zeros."""
    a = torch.where(_grouped_adapter_columns(in_mask, groups), lora_a, 0)
    b = torch.where(out_mask[:, None], lora_b, 0)
    return a, b


def _splora_centre_fn(lora_a: Tensor | None, lora_b: Tensor | None, scale: float, groups: int):
    if lora_a is None:
        return None

    def centre_fn(in_mask: Tensor, out_mask: Tensor) -> Tensor:
        a, b = _splora_masked_factors(lora_a, lora_b, in_mask, out_mask, groups)
        return scale * (b @ a)

    return centre_fn


def splora_conv_forward(x, weight, lora_a, lora_b, bias, in_idx, out_idx, stride: Geometry, padding: Geometry,
                        dilation: Geometry, groups: int, scale: float) -> Tensor:
    centre_fn = _splora_centre_fn(lora_a, lora_b, scale, groups)
    return _grouped_forward(x, weight, centre_fn, bias, in_idx, out_idx, stride, padding, dilation, groups)


def splora_conv_backward(grad_out, x, weight, lora_a, lora_b, in_idx, out_idx, stride: Geometry, padding: Geometry,
                         dilation: Geometry, groups: int, scale: float, output_mask) -> tuple[Tensor | None, ...]:
    """Gradients of (x, weight, lora_a, lora_b, bias); ``None`` where not asked for."""
    need_x, need_w, need_a, need_b, need_bias = output_mask
    need_a, need_b = need_a and lora_a is not None, need_b and lora_a is not None
    grad_x, grad_w, grad_centre, grad_bias, masks = _grouped_backward(
        grad_out, x, weight, _splora_centre_fn(lora_a, lora_b, scale, groups), in_idx, out_idx, stride, padding,
        dilation, groups, need_x, need_w, need_a or need_b,
    )
    grad_a = grad_b = None
    if need_a or need_b:  # through the centre tap: dW_c = s·dB A, so dA = s·Bᵀ dW_c and dB = s·dW_c Aᵀ
        a, b = _splora_masked_factors(lora_a, lora_b, *masks, groups)
        grad_a = scale * (b.t() @ grad_centre) if need_a else None
        grad_b = scale * (grad_centre @ a.t()) if need_b else None
    return grad_x, grad_w, grad_a, grad_b, grad_bias if need_bias else None


def _sppara_centre_fn(adapter: Tensor, groups: int):
    def centre_fn(in_mask: Tensor, out_mask: Tensor) -> Tensor:
        return torch.where(out_mask[:, None] & _grouped_adapter_columns(in_mask, groups), adapter, 0)

    return centre_fn


def sppara_conv_forward(x, weight, adapter, bias, in_idx, out_idx, stride: Geometry, padding: Geometry,
                        dilation: Geometry, groups: int) -> Tensor:
    centre_fn = _sppara_centre_fn(adapter, groups)
    return _grouped_forward(x, weight, centre_fn, bias, in_idx, out_idx, stride, padding, dilation, groups)


def sppara_conv_backward(grad_out, x, weight, adapter, in_idx, out_idx, stride: Geometry, padding: Geometry,
                         dilation: Geometry, groups: int, output_mask) -> tuple[Tensor | None, ...]:
    """Gradients of (x, weight, adapter, bias); ``None`` where not asked for."""
    need_x, need_w, need_p, need_bias = output_mask
    grad_x, grad_w, grad_centre, grad_bias, _ = _grouped_backward(
        grad_out, x, weight, _sppara_centre_fn(adapter, groups), in_idx, out_idx, stride, padding,
        dilation, groups, need_x, need_w, need_p,
    )
    return grad_x, grad_w, grad_centre if need_p else None, grad_bias if need_bias else None
