"""SPLoRA and SPPaRA convolutions on the compiled extension.

One C++ op pair (``torch.ops.spa_kernels_cpu.conv_forward``/``conv_backward``)
serves both families: SPLoRA passes ``lora_a``/``lora_b`` and no ``adapter``,
SPPaRA the reverse.  ``groups`` is always 1 here: the backend's capabilities
exclude grouped convolutions, and the op layer checks them before calling.
Compact activations are native: the flags go straight to the C++ ops.
The ``*_autograd`` entries are the op whole, forward and backward kernels joined
by an autograd written in C++ (``torch.ops.spa_kernels_cpu.conv``), for eager calls.
They call the extension's binding of that op (``_C.conv``), the same C++ function
without the dispatcher's parsing of its arguments against the schema.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import _extension
from .. import check_groups


def splora_conv_forward(x, weight, lora_a, lora_b, bias, in_idx, out_idx, stride, padding, dilation, groups,
                        scale, *, compact_input=False, compact_output=False) -> Tensor:
    return torch.ops.spa_kernels_cpu.conv_forward(
        x, weight, lora_a, lora_b, None, bias, in_idx, out_idx, list(stride), list(padding), list(dilation), scale,
        compact_input, compact_output,
    )


def splora_conv_backward(grad_out, x, weight, lora_a, lora_b, in_idx, out_idx, stride, padding, dilation, groups,
                         scale, output_mask, *, compact_input=False, compact_output=False):
    need_x, need_w, need_a, need_b, need_bias = output_mask
    grads = torch.ops.spa_kernels_cpu.conv_backward(
        grad_out, x, weight, lora_a, lora_b, None, in_idx, out_idx, list(stride), list(padding), list(dilation),
        scale, [need_x, need_w, need_a, need_b, False, need_bias], compact_input, compact_output,
    )
    grad_x, grad_w, grad_a, grad_b, _, grad_bias = grads
    return grad_x, grad_w, grad_a, grad_b, grad_bias


def sppara_conv_forward(x, weight, adapter, bias, in_idx, out_idx, stride, padding, dilation, groups, *,
                        compact_input=False, compact_output=False) -> Tensor:
    return torch.ops.spa_kernels_cpu.conv_forward(
        x, weight, None, None, adapter, bias, in_idx, out_idx, list(stride), list(padding), list(dilation), 1.0,
        compact_input, compact_output,
    )


def sppara_conv_backward(grad_out, x, weight, adapter, in_idx, out_idx, stride, padding, dilation, groups,
                         output_mask, *, compact_input=False, compact_output=False):
    need_x, need_w, need_p, need_bias = output_mask
    grads = torch.ops.spa_kernels_cpu.conv_backward(
        grad_out, x, weight, None, None, adapter, in_idx, out_idx, list(stride), list(padding), list(dilation),
        1.0, [need_x, need_w, False, False, need_p, need_bias], compact_input, compact_output,
    )
    grad_x, grad_w, _, _, grad_p, grad_bias = grads
    return grad_x, grad_w, grad_p, grad_bias


def splora_conv_autograd(x, weight, lora_a, lora_b, bias, in_idx, out_idx, stride, padding, dilation, groups, scale,
                         compact_input=False, compact_output=False) -> Tensor:
    check_groups("cpu", groups)
    return _extension.extension.conv(
        x, weight, lora_a, lora_b, None, bias, in_idx, out_idx, stride, padding, dilation, scale, compact_input,
        compact_output,
    )


def sppara_conv_autograd(x, weight, adapter, bias, in_idx, out_idx, stride, padding, dilation, groups,
                         compact_input=False, compact_output=False) -> Tensor:
    check_groups("cpu", groups)
    return _extension.extension.conv(
        x, weight, None, None, adapter, bias, in_idx, out_idx, stride, padding, dilation, 1.0, compact_input,
        compact_output,
    )
