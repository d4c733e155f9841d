"""``splora_linear`` on the cuda backend: the Python side of ``csrc/cuda/linear.cu``."""

from __future__ import annotations

from torch import Tensor

from .extension import index_list, kernels, only_requested


def splora_linear_forward(x, weight, lora_a, lora_b, bias, in_idx, out_idx, scale) -> Tensor:
    return kernels().linear_forward(
        x, weight, lora_a, lora_b, bias, index_list(in_idx), index_list(out_idx), float(scale)
    )


def splora_linear_backward(grad_out, x, weight, lora_a, lora_b, in_idx, out_idx, scale, output_mask):
    requested = [bool(m) for m in output_mask]
    grads = kernels().linear_backward(
        grad_out, x, weight, lora_a, lora_b, index_list(in_idx), index_list(out_idx), float(scale), requested
    )
    if lora_a is None:
        requested[2] = requested[3] = False
    return only_requested(grads, requested)
