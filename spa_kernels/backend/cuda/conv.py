"""SPLoRA and SPPaRA convolutions on the cuda backend: the Python side of ``csrc/cuda/conv.cu``.

The registry has checked ``groups == 1`` (the backend's capabilities) before any call reaches here.
"""

from __future__ import annotations

from torch import Tensor

from .extension import index_list, kernels, only_requested


def splora_conv_forward(x, weight, lora_a, lora_b, bias, in_idx, out_idx, stride, padding, dilation, groups,
                        scale) -> Tensor:
    return kernels().conv_forward(
        x, weight, lora_a, lora_b, None, bias, index_list(in_idx), index_list(out_idx),
        list(stride), list(padding), list(dilation), float(scale),
    )


def splora_conv_backward(grad_out, x, weight, lora_a, lora_b, in_idx, out_idx, stride, padding, dilation, groups,
                         scale, output_mask):
    need_x, need_w, need_a, need_b, need_bias = (bool(m) for m in output_mask)
    has_lora = lora_a is not None
    requested = [need_x, need_w, need_a and has_lora, need_b and has_lora, False, need_bias]
    grads = kernels().conv_backward(
        grad_out, x, weight, lora_a, lora_b, None, index_list(in_idx), index_list(out_idx),
        list(stride), list(padding), list(dilation), float(scale), requested,
    )
    grad_x, grad_w, grad_a, grad_b, _, grad_bias = only_requested(grads, requested)
    return grad_x, grad_w, grad_a, grad_b, grad_bias


def sppara_conv_forward(x, weight, adapter, bias, in_idx, out_idx, stride, padding, dilation, groups) -> Tensor:
    return kernels().conv_forward(
        x, weight, None, None, adapter, bias, index_list(in_idx), index_list(out_idx),
        list(stride), list(padding), list(dilation), 1.0,
    )


def sppara_conv_backward(grad_out, x, weight, adapter, in_idx, out_idx, stride, padding, dilation, groups,
                         output_mask):
    need_x, need_w, need_p, need_bias = (bool(m) for m in output_mask)
    requested = [need_x, need_w, False, False, need_p, need_bias]
    grads = kernels().conv_backward(
        grad_out, x, weight, None, None, adapter, index_list(in_idx), index_list(out_idx),
        list(stride), list(padding), list(dilation), 1.0, requested,
    )
    grad_x, grad_w, _, _, grad_p, grad_bias = only_requested(grads, requested)
    return grad_x, grad_w, grad_p, grad_bias
