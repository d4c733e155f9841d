"""The ``cuda`` backend: fused CUDA C++ kernels from ``csrc/cuda`` (extension ``spa_kernels._C_cuda``).

Every op is a short list of gathered GEMMs (``csrc/cuda/op_problems.h``): only
active output tiles are launched, the pruned outputs are zeroed by the same
launch, the adapter runs as a second K phase into the same fp32 accumulators,
and bf16/fp16 use the tensor cores (``mma.sync``).

The extension is built only where PyTorch has CUDA, and the package imports
without it.  The backend registers itself when the extension loads, so
``backend="cuda"`` can be asked for; auto selection does not choose it until it
has passed its tests on a GPU (``PASSED_ON_HARDWARE``, and the registry's
``AUTO_PREFERENCE``).
"""

from __future__ import annotations

import logging

import torch

from .. import Backend, Capabilities, register_backend
from . import conv, linear
from .conv import splora_conv_backward, splora_conv_forward, sppara_conv_backward, sppara_conv_forward
from .extension import BUILD_ERROR, BUILT
from .linear import splora_linear_backward, splora_linear_forward

logger = logging.getLogger("spa_kernels")

name = "cuda"
CAPABILITIES = Capabilities(devices=("cuda",), dtypes=(torch.float32, torch.bfloat16, torch.float16))

# Flip to True, and put "cuda" first in AUTO_PREFERENCE["cuda"], in the commit that
# records a passing `make gpu-check` (bench/results/).
PASSED_ON_HARDWARE = False


def ready(device_type: str) -> bool:
    return torch.cuda.is_available()


def is_available(device_type: str, dtype: torch.dtype | None = None) -> bool:
    return BUILT and CAPABILITIES.runs(device_type, dtype) and ready(device_type)


if BUILT:
    register_backend(Backend(name, CAPABILITIES, kernels=(linear, conv), ready=ready))

__all__ = [
    "BUILD_ERROR",
    "BUILT",
    "CAPABILITIES",
    "PASSED_ON_HARDWARE",
    "is_available",
    "name",
    "ready",
    "splora_conv_backward",
    "splora_conv_forward",
    "splora_linear_backward",
    "splora_linear_forward",
    "sppara_conv_backward",
    "sppara_conv_forward",
]
