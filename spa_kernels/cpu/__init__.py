"""The ``cpu`` backend: fused C++ kernels from ``csrc/cpu`` (OpenMP, AVX-512/AVX2).

Available only when the compiled extension ``spa_kernels._C`` imports; the
package works without it (auto selection then falls back to the reference).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

logger = logging.getLogger("spa_kernels")

name = "cpu"
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

try:
    from .. import _C  # noqa: F401  (registers torch.ops.spa_kernels_cpu)

    BUILT = True
    BUILD_ERROR: str | None = None
except ImportError as error:  # the package must import without its build
    _C = None
    BUILT = False
    BUILD_ERROR = str(error)
    logger.debug("spa_kernels._C is not available, cpu backend disabled: %s", error)


def is_available(device_type: str, dtype: torch.dtype | None) -> bool:
    return BUILT and device_type == "cpu" and (dtype is None or dtype in SUPPORTED_DTYPES)


def isa() -> str:
    """Instruction set the kernels dispatch to: ``"avx512"``, ``"avx2"`` or ``"generic"``."""
    return _C.cpu_isa() if BUILT else "unavailable"


def set_isa(isa_name: str) -> None:
    """Force an instruction set (for tests); only ones this CPU supports are accepted."""
    if not BUILT:
        raise RuntimeError(f"the cpu backend is not built: {BUILD_ERROR}")
    _C.set_cpu_isa(isa_name)


def supported_isas() -> list[str]:
    return list(_C.supported_cpu_isas()) if BUILT else []


def max_threads() -> int | None:
    """OpenMP threads a kernel call may use (None without the build)."""
    return _C.max_threads() if BUILT else None


def extension_path() -> str | None:
    """File the compiled extension was loaded from (None without the build)."""
    return _C.__file__ if BUILT else None


def splora_linear_forward(x, weight, lora_a, lora_b, bias, in_idx, out_idx, scale) -> Tensor:
    return torch.ops.spa_kernels_cpu.splora_linear_forward(
        x, weight, lora_a, lora_b, bias, in_idx, out_idx, scale
    )


def splora_linear_backward(grad_out, x, weight, lora_a, lora_b, in_idx, out_idx, scale, output_mask):
    return tuple(
        torch.ops.spa_kernels_cpu.splora_linear_backward(
            grad_out, x, weight, lora_a, lora_b, in_idx, out_idx, scale, list(output_mask)
        )
    )


def _fused_groups_only(groups: int) -> None:
    if groups != 1:
        raise ValueError(f"the cpu backend runs convolutions with groups=1 only, got groups={groups}")


def splora_conv_forward(x, weight, lora_a, lora_b, bias, in_idx, out_idx, scale, stride, padding, dilation, groups):
    _fused_groups_only(groups)
    return torch.ops.spa_kernels_cpu.conv_forward(
        x, weight, lora_a, lora_b, None, bias, in_idx, out_idx, scale, list(stride), list(padding), list(dilation)
    )


def splora_conv_backward(
    grad_out, x, weight, lora_a, lora_b, in_idx, out_idx, scale, stride, padding, dilation, groups, output_mask
):
    _fused_groups_only(groups)
    need_x, need_w, need_a, need_b, need_bias = output_mask
    grads = torch.ops.spa_kernels_cpu.conv_backward(
        grad_out, x, weight, lora_a, lora_b, None, in_idx, out_idx, scale,
        list(stride), list(padding), list(dilation), [need_x, need_w, need_a, need_b, False, need_bias],
    )
    grad_x, grad_w, grad_a, grad_b, _, grad_bias = grads
    return grad_x, grad_w, grad_a, grad_b, grad_bias


def sppara_conv_forward(x, weight, adapter, bias, in_idx, out_idx, stride, padding, dilation, groups):
    _fused_groups_only(groups)
    return torch.ops.spa_kernels_cpu.conv_forward(
        x, weight, None, None, adapter, bias, in_idx, out_idx, 1.0, list(stride), list(padding), list(dilation)
    )


def sppara_conv_backward(grad_out, x, weight, adapter, in_idx, out_idx, stride, padding, dilation, groups, output_mask):
    _fused_groups_only(groups)
    need_x, need_w, need_p, need_bias = output_mask
    grads = torch.ops.spa_kernels_cpu.conv_backward(
        grad_out, x, weight, None, None, adapter, in_idx, out_idx, 1.0,
        list(stride), list(padding), list(dilation), [need_x, need_w, False, False, need_p, need_bias],
    )
    grad_x, grad_w, _, _, grad_p, grad_bias = grads
    return grad_x, grad_w, grad_p, grad_bias
