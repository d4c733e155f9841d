"""The op layer: ``torch.ops.spa_kernels.*``, one file per op family.

``library.py`` holds the ``torch.library.Library`` and the helpers the families
share, and :func:`call`, which runs an op without the dispatcher in plain eager
code; ``linear.py``, ``conv.py`` and ``splopa.py`` each define their ops' schemas, fake
kernels and autograd.  Importing this package registers every op.  The ops
take an already-validated call and an already-resolved backend name; the
functional layer does both.
"""

from .conv import splora_conv, splora_conv_backward, sppara_conv, sppara_conv_backward
from .library import call
from .linear import splora_linear, splora_linear_backward
from .splopa import splopa_linear, splopa_linear_backward

__all__ = [
    "call",
    "splopa_linear",
    "splopa_linear_backward",
    "splora_conv",
    "splora_conv_backward",
    "splora_linear",
    "splora_linear_backward",
    "sppara_conv",
    "sppara_conv_backward",
]
