"""The functional layer: validate the arguments, choose a backend, call the op.

One file per op family (``linear.py``, ``conv.py``).  Each public function has a
``*_trusted`` form for modules, whose index lists are valid by construction: it
skips the checks that read index values (a host sync on GPUs).
"""

from .conv import (
    splora_conv1d,
    splora_conv2d,
    splora_conv3d,
    splora_conv_trusted,
    sppara_conv1d,
    sppara_conv2d,
    sppara_conv3d,
    sppara_conv_trusted,
)
from .linear import splora_linear, splora_linear_trusted
from .splopa import splopa_linear, splopa_linear_trusted

__all__ = [
    "splopa_linear",
    "splopa_linear_trusted",
    "splora_conv1d",
    "splora_conv2d",
    "splora_conv3d",
    "splora_conv_trusted",
    "splora_linear",
    "splora_linear_trusted",
    "sppara_conv1d",
    "sppara_conv2d",
    "sppara_conv3d",
    "sppara_conv_trusted",
]
