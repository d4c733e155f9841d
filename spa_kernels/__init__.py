"""spa_kernels: fused kernels for channel-pruned Structured Pruning Adapters.

Masked channels cost nothing: every op computes the base layer and its adapter
over the active channels only, on the backend that is fastest for the device.
"""

from . import _backend, cpu, reference
from ._backend import use_backend
from .backends import cuda as _cuda_backend
from .functional import (
    splora_conv1d,
    splora_conv2d,
    splora_conv3d,
    splora_linear,
    sppara_conv1d,
    sppara_conv2d,
    sppara_conv3d,
)

# Importing the `backends` subpackage above bound that name to it; the public function wins.
backends = _backend.backends

_backend.register_backend(reference)
if cpu.BUILT:
    _backend.register_backend(cpu)
if _cuda_backend.BUILT:
    _cuda_backend.register()

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
    "splora_conv1d",
    "splora_conv2d",
    "splora_conv3d",
    "splora_linear",
    "sppara_conv1d",
    "sppara_conv2d",
    "sppara_conv3d",
    "use_backend",
]
