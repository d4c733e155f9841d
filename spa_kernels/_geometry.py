"""Convolution geometry: the one place the package computes output sizes.

Validation, the op layer's fake kernels and every Python backend take their
output shapes from here, so they cannot disagree.  The C++ kernels keep their
single copy in ``csrc/cpu/conv_geometry.h``.  The functions work on symbolic
sizes too, which is what fake kernels see under ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Length of one spatial output dimension, as ``torch.nn.Conv*d`` computes it.

    ``(size + 2·padding − dilation·(kernel − 1) − 1) // stride + 1``; below 1
    when the input is too small for the kernel.
    """
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_output_spatial(
    x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> list:
    """The spatial output sizes of convolving ``x`` (N, C, *spatial) with ``weight`` (C_out, C_in, *kernel)."""
    return [
        conv_output_size(size, k, st, pad, dil)
        for size, k, st, pad, dil in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation, strict=True)
    ]


def conv_output_shape(
    x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> list:
    """``(N, C_out, *spatial_out)``."""
    return [x.shape[0], weight.shape[0], *conv_output_spatial(x, weight, stride, padding, dilation)]
