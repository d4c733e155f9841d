"""spa_kernels: fused kernels for channel-pruned Structured Pruning Adapters.

Masked channels cost nothing: every op computes the base layer and its adapter
over the active channels only, on the backend that is fastest for the device.

Layers, each a folder: ``functional`` (public functions) -> ``ops`` (the
``torch.ops.spa_kernels`` schemas, fake kernels, autograd) -> ``backend``
(the policy, and one package per backend).  Importing a backend package
registers it; the ones below are imported here.
"""

from . import nn, ops, pruning  # noqa: F401  (ops: importing it registers torch.ops.spa_kernels.*)
from ._config import show_config
from .backend import backends, use_backend
from .backend import cpu as _cpu_backend  # noqa: F401  (registers itself when the extension is built)
from .backend import cuda as _cuda_backend  # noqa: F401  (registers itself where the CUDA extension is built)
from .backend import reference as _reference_backend  # noqa: F401  (registers itself)
from .backend import triton as _triton_backend  # noqa: F401  (registers itself when Triton is usable)
from .compact import compact
from .compact_activations import compact_activations, expand_activations
from .convert import convert
from .convert_splopa import convert_splopa
from .functional import (
    splopa_linear,
    splora_conv1d,
    splora_conv2d,
    splora_conv3d,
    splora_linear,
    sppara_conv1d,
    sppara_conv2d,
    sppara_conv3d,
)

__version__ = "0.1.0"

__all__ = [
    "backends",
    "compact",
    "compact_activations",
    "convert",
    "convert_splopa",
    "expand_activations",
    "nn",
    "pruning",
    "show_config",
    "splopa_linear",
    "splora_conv1d",
    "splora_conv2d",
    "splora_conv3d",
    "splora_linear",
    "sppara_conv1d",
    "sppara_conv2d",
    "sppara_conv3d",
    "use_backend",
]
