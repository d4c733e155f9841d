"""PyTorch's convolution primitives by dimensionality, and the centre-tap helpers.

Shared by the two reference formulations (``conv.py`` for groups = 1 on the
active block, ``conv_grouped.py`` for groups > 1 in masked form), so that
neither imports the other's internals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

Geometry = tuple[int, ...]

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_INPUT_GRAD = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}
CONV_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def centre_tap(weight: Tensor) -> tuple:
    """Index of the centre tap: ``weight[centre_tap(weight)]`` is ``(C_out, C_in/groups)``."""
    return (slice(None), slice(None), *(k // 2 for k in weight.shape[2:]))


def broadcast(mask: Tensor, ndim: int, dim: int = 0) -> Tensor:
    """``mask`` viewed to broadcast along dimension ``dim`` of an ``ndim``-D tensor."""
    shape = [1] * ndim
    shape[dim] = -1
    return mask.view(shape)
