"""Plain PyTorch backend: readable, runs on any device, and the test oracle."""

import torch

from .conv import (
    splora_conv_backward,
    splora_conv_forward,
    sppara_conv_backward,
    sppara_conv_forward,
)
from .linear import splora_linear_backward, splora_linear_forward

name = "reference"


def is_available(device_type: str, dtype: torch.dtype | None) -> bool:
    return True


__all__ = [
    "is_available",
    "name",
    "splora_conv_backward",
    "splora_conv_forward",
    "splora_linear_backward",
    "splora_linear_forward",
    "sppara_conv_backward",
    "sppara_conv_forward",
]
