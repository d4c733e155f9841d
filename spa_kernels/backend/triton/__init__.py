"""The ``triton`` backend: fused Triton kernels for GPUs, and for CPUs under the interpreter.

On CUDA devices the kernels are compiled and autotuned.  On the CPU they run only
in Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is imported),
which is how the test suite checks them on machines without a GPU; it is far too
slow to be picked automatically.  Without a usable Triton this package still
imports, with ``IMPORTED = False``, and does not register the backend.
"""

from __future__ import annotations

import logging
import os

import torch

from .. import Backend, Capabilities, register_backend

logger = logging.getLogger("spa_kernels")

name = "triton"
CAPABILITIES = Capabilities(devices=("cuda", "cpu"), dtypes=(torch.float32, torch.bfloat16, torch.float16))

try:
    import triton  # noqa: F401

    from . import conv, conv_backward, linear, linear_backward, splopa, splopa_backward
    from .conv import splora_conv_forward, sppara_conv_forward
    from .conv_backward import splora_conv_backward, sppara_conv_backward
    from .linear import INTERPRETED, splora_linear_forward
    from .linear_backward import splora_linear_backward
    from .splopa import splopa_linear_forward
    from .splopa_backward import splopa_linear_backward

    IMPORTED = True
    IMPORT_ERROR: str | None = None
except Exception as error:  # Triton is optional; a broken install must not break the package
    IMPORTED = False
    INTERPRETED = False
    IMPORT_ERROR = f"{type(error).__name__}: {error}"
    logger.debug("Triton is not usable, triton backend disabled: %s", IMPORT_ERROR)


def ready(device_type: str) -> bool:
    """Whether the kernels can run on ``device_type`` now, beyond what ``CAPABILITIES`` says.

    CPU tensors need ``TRITON_INTERPRET=1`` now (read at every call) and when the
    kernels were decorated at import, since that is when Triton chose to interpret.
    """
    if device_type == "cuda":
        return torch.cuda.is_available()
    return INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1"


def is_available(device_type: str, dtype: torch.dtype | None = None) -> bool:
    """Whether the kernels can run on ``device_type`` tensors of ``dtype`` (None: any dtype)."""
    return IMPORTED and CAPABILITIES.runs(device_type, dtype) and ready(device_type)


if IMPORTED:
    register_backend(Backend(
        name, CAPABILITIES, kernels=(linear, linear_backward, conv, conv_backward, splopa, splopa_backward), ready=ready
    ))

__all__ = [
    "CAPABILITIES",
    "IMPORTED",
    "INTERPRETED",
    "is_available",
    "name",
    "ready",
    "splopa_linear_backward",
    "splopa_linear_forward",
    "splora_conv_backward",
    "splora_conv_forward",
    "splora_linear_backward",
    "splora_linear_forward",
    "sppara_conv_backward",
    "sppara_conv_forward",
]
