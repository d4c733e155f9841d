"""Plain PyTorch backend: readable, runs on any device, and the test oracle."""

from ..._validation import SUPPORTED_DTYPES
from .. import Backend, Capabilities, register_backend
from . import conv, linear, splopa
from .conv import (
    splora_conv_backward,
    splora_conv_forward,
    sppara_conv_backward,
    sppara_conv_forward,
)
from .linear import splora_linear_backward, splora_linear_forward
from .splopa import splopa_linear_backward, splopa_linear_forward

name = "reference"
CAPABILITIES = Capabilities(devices=None, dtypes=SUPPORTED_DTYPES, grouped_conv=True, compact_activations=True)

register_backend(Backend(name, CAPABILITIES, kernels=(linear, conv, splopa)))

__all__ = [
    "CAPABILITIES",
    "name",
    "splopa_linear_backward",
    "splopa_linear_forward",
    "splora_conv_backward",
    "splora_conv_forward",
    "splora_linear_backward",
    "splora_linear_forward",
    "sppara_conv_backward",
    "sppara_conv_forward",
]
