"""SPLoRA linear on the compiled extension (``torch.ops.spa_kernels_cpu.splora_linear*``).

Compact activations are native: the flags go straight to the C++ ops.
``splora_linear_autograd`` is the forward and backward kernels joined by an
autograd written in C++ (csrc/cpu/autograd.cpp); the op layer calls it in eager
code, where a Python autograd formula would cost more than a small layer computes.
It calls the extension's binding of ``torch.ops.spa_kernels_cpu.splora_linear``
(``_C.splora_linear``): the same C++ function, without the dispatcher's parsing
of its arguments against the schema.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import _extension


def splora_linear_forward(x, weight, lora_a, lora_b, bias, in_idx, out_idx, scale, *, compact_input=False,
                          compact_output=False) -> Tensor:
    return torch.ops.spa_kernels_cpu.splora_linear_forward(
        x, weight, lora_a, lora_b, bias, in_idx, out_idx, scale, compact_input, compact_output
    )


def splora_linear_backward(grad_out, x, weight, lora_a, lora_b, in_idx, out_idx, scale, output_mask, *,
                           compact_input=False, compact_output=False):
    return tuple(
        torch.ops.spa_kernels_cpu.splora_linear_backward(
            grad_out, x, weight, lora_a, lora_b, in_idx, out_idx, scale, list(output_mask), compact_input,
            compact_output,
        )
    )


# The binding itself, not a Python function calling it: one frame fewer per call.
# The backend registers only where the extension is built.
splora_linear_autograd = _extension.extension.splora_linear if _extension.BUILT else None
