"""The ``cuda`` backend: fused CUDA C++ kernels from ``csrc/cuda`` (extension ``spa_kernels._C_cuda``).

Every op is a short list of gathered GEMMs (``csrc/cuda/op_problems.h``): only
active output tiles are launched, the pruned outputs are zeroed by the same
launch, the adapter runs as a second K phase into the same fp32 accumulators,
and bf16/fp16 use the tensor cores (``mma.sync``).

The extension is built only where PyTorch has CUDA.  This backend is selectable
explicitly (``backend="cuda"``) but auto selection does not choose it until it
has passed its tests on a GPU (``PASSED_ON_HARDWARE``).  Call :func:`register`
once to make it known to the backend policy.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

logger = logging.getLogger("spa_kernels")

name = "cuda"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Flip to True in the commit that records a passing `make gpu-check` (bench/results/).
PASSED_ON_HARDWARE = False

try:
    from ... import _C_cuda  # type: ignore[attr-defined]

    BUILT = True
    BUILD_ERROR: str | None = None
except ImportError as error:  # built only where torch has CUDA; the package must import without it
    _C_cuda = None
    BUILT = False
    BUILD_ERROR = str(error)
    logger.debug("spa_kernels._C_cuda is not available, cuda backend disabled: %s", error)


def is_available(device_type: str, dtype: torch.dtype | None) -> bool:
    return (
        BUILT
        and device_type == "cuda"
        and torch.cuda.is_available()
        and (dtype is None or dtype in SUPPORTED_DTYPES)
    )


def register() -> None:
    """Make ``backend="cuda"`` selectable (auto selection lists it only once it has passed on a GPU)."""
    import sys

    from ... import _backend

    _backend.register_backend(sys.modules[__name__])


def _index(idx: Tensor | None) -> Tensor | None:
    """The kernels read int32 lists (channel counts are checked to fit)."""
    if idx is None:
        return None
    return idx.to(torch.int32).contiguous() if idx.dtype != torch.int32 else idx.contiguous()


def _require_built() -> None:
    if not BUILT:
        raise RuntimeError(f"the cuda backend is not built: {BUILD_ERROR}")


def _fused_groups_only(groups: int) -> None:
    if groups != 1:
        raise ValueError(f"the cuda backend runs convolutions with groups=1 only, got groups={groups}")


def _none_unless(grads, mask) -> tuple:
    return tuple(g if want else None for g, want in zip(grads, mask, strict=True))


def splora_linear_forward(x, weight, lora_a, lora_b, bias, in_idx, out_idx, scale) -> Tensor:
    _require_built()
    return _C_cuda.linear_forward(x, weight, lora_a, lora_b, bias, _index(in_idx), _index(out_idx), float(scale))


def splora_linear_backward(grad_out, x, weight, lora_a, lora_b, in_idx, out_idx, scale, output_mask):
    _require_built()
    mask = [bool(m) for m in output_mask]
    grads = _C_cuda.linear_backward(
        grad_out, x, weight, lora_a, lora_b, _index(in_idx), _index(out_idx), float(scale), mask
    )
    if lora_a is None:
        mask[2] = mask[3] = False
    return _none_unless(grads, mask)


def splora_conv_forward(x, weight, lora_a, lora_b, bias, in_idx, out_idx, scale, stride, padding, dilation, groups):
    _require_built()
    _fused_groups_only(groups)
    return _C_cuda.conv_forward(
        x, weight, lora_a, lora_b, None, bias, _index(in_idx), _index(out_idx), float(scale),
        list(stride), list(padding), list(dilation),
    )


def splora_conv_backward(
    grad_out, x, weight, lora_a, lora_b, in_idx, out_idx, scale, stride, padding, dilation, groups, output_mask
):
    _require_built()
    _fused_groups_only(groups)
    need_x, need_w, need_a, need_b, need_bias = (bool(m) for m in output_mask)
    has_lora = lora_a is not None
    mask = [need_x, need_w, need_a and has_lora, need_b and has_lora, False, need_bias]
    grads = _C_cuda.conv_backward(
        grad_out, x, weight, lora_a, lora_b, None, _index(in_idx), _index(out_idx), float(scale),
        list(stride), list(padding), list(dilation), mask,
    )
    grad_x, grad_w, grad_a, grad_b, _, grad_bias = _none_unless(grads, mask)
    return grad_x, grad_w, grad_a, grad_b, grad_bias


def sppara_conv_forward(x, weight, adapter, bias, in_idx, out_idx, stride, padding, dilation, groups):
    _require_built()
    _fused_groups_only(groups)
    return _C_cuda.conv_forward(
        x, weight, None, None, adapter, bias, _index(in_idx), _index(out_idx), 1.0,
        list(stride), list(padding), list(dilation),
    )


def sppara_conv_backward(grad_out, x, weight, adapter, in_idx, out_idx, stride, padding, dilation, groups, output_mask):
    _require_built()
    _fused_groups_only(groups)
    need_x, need_w, need_p, need_bias = (bool(m) for m in output_mask)
    mask = [need_x, need_w, False, False, need_p, need_bias]
    grads = _C_cuda.conv_backward(
        grad_out, x, weight, None, None, adapter, _index(in_idx), _index(out_idx), 1.0,
        list(stride), list(padding), list(dilation), mask,
    )
    grad_x, grad_w, _, _, grad_p, grad_bias = _none_unless(grads, mask)
    return grad_x, grad_w, grad_p, grad_bias
