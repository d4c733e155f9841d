"""Block-SPA (SPLoPA) linear on the compiled extension (``torch.ops.spa_kernels_cpu.splopa_linear_*``)."""

from __future__ import annotations

import torch
from torch import Tensor


def splopa_linear_forward(x, weight, prototype_rows, prototype_cols, pos_weights, bias, block_mask, scale) -> Tensor:
    return torch.ops.spa_kernels_cpu.splopa_linear_forward(
        x, weight, prototype_rows, prototype_cols, pos_weights, bias, block_mask, scale
    )


def splopa_linear_backward(grad_out, x, weight, prototype_rows, prototype_cols, pos_weights, block_mask, scale,
                           output_mask):
    grads = torch.ops.spa_kernels_cpu.splopa_linear_backward(
        grad_out, x, weight, prototype_rows, prototype_cols, pos_weights, block_mask, scale, list(output_mask)
    )
    return tuple(g if want else None for g, want in zip(grads, output_mask, strict=True))
