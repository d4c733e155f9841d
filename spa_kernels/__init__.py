"""spa_kernels: fused kernels for channel-pruned Structured Pruning Adapters.

Masked channels cost nothing: every op computes the base layer and its adapter
over the active channels only, on the backend that is fastest for the device.
"""

from . import _backend, cpu, reference
from ._backend import backends, use_backend
from ._config import show_config
from .functional import (
    splora_conv1d,
    splora_conv2d,
    splora_conv3d,
    splora_linear,
    sppara_conv1d,
    sppara_conv2d,
    sppara_conv3d,
)

_backend.register_backend(reference)
if cpu.BUILT:
    _backend.register_backend(cpu)

try:
    from . import triton as _triton_backend
except ImportError:  # Triton is optional
    _triton_backend = None
if _triton_backend is not None and getattr(_triton_backend, "IMPORTED", False):
    _backend.register_backend(_triton_backend)

from . import nn, pruning  # noqa: E402  (modules use the functional layer above; pruning, the modules)
from .convert import convert  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "backends",
    "convert",
    "nn",
    "pruning",
    "show_config",
    "splora_conv1d",
    "splora_conv2d",
    "splora_conv3d",
    "splora_linear",
    "sppara_conv1d",
    "sppara_conv2d",
    "sppara_conv3d",
    "use_backend",
]
