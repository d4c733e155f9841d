"""Host-side geometry of the Triton convolutions: shapes in three spatial dims, operand checks.

Every convolution is run as a 3-D one (conv1d and conv2d get unit dims in
front), so the kernels have one form; :class:`ConvShape` holds that geometry.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from ..._geometry import conv_output_size


def _triple(values: tuple[int, ...], fill: int) -> tuple[int, int, int]:
    """Per-dim values padded in front to three spatial dims (conv1d's one dim becomes w)."""
    return (fill,) * (3 - len(values)) + tuple(int(v) for v in values)


def as_5d(t: Tensor) -> Tensor:
    """``t`` (a, b, *spatial) viewed with three spatial dims, unit dims in front."""
    return t.reshape(*t.shape[:2], *_triple(tuple(t.shape[2:]), 1))


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """The geometry of one convolution, always with three spatial dims (d, h, w)."""

    dims: int  # spatial dims of the caller's tensors: 1, 2 or 3
    batch: int
    in_size: tuple[int, int, int]
    out_size: tuple[int, int, int]
    kernel: tuple[int, int, int]
    stride: tuple[int, int, int]
    padding: tuple[int, int, int]
    dilation: tuple[int, int, int]

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1] * self.kernel[2]

    @property
    def out_positions(self) -> int:
        return self.out_size[0] * self.out_size[1] * self.out_size[2]

    def centre_tap(self) -> ConvShape:
        """The 1-tap convolution that reads what the centre tap reads (same stride)."""
        return dataclasses.replace(
            self,
            kernel=(1, 1, 1),
            padding=tuple(p - (k // 2) * d for p, k, d in zip(self.padding, self.kernel, self.dilation, strict=True)),
            dilation=(1, 1, 1),
        )

    def pointwise(self) -> ConvShape:
        """The 1×1 stride-1 convolution over the output grid (for tensors shaped like dy)."""
        return ConvShape(
            self.dims, self.batch, self.out_size, self.out_size, (1, 1, 1), (1, 1, 1), (0, 0, 0), (1, 1, 1)
        )


def conv_shape(
    x: Tensor, weight: Tensor, stride: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...]
) -> ConvShape:
    dims = x.dim() - 2
    kernel = tuple(weight.shape[2:])
    stride, padding, dilation = (tuple(int(v) for v in arg) for arg in (stride, padding, dilation))
    if len(stride) != dims or len(padding) != dims or len(dilation) != dims:
        raise ValueError(f"stride, padding and dilation need {dims} values each, got {stride}, {padding}, {dilation}")
    if any(s < 1 for s in stride) or any(d < 1 for d in dilation) or any(p < 0 for p in padding):
        raise ValueError(f"need stride >= 1, dilation >= 1, padding >= 0; got {stride}, {dilation}, {padding}")
    out_size = tuple(
        conv_output_size(size, k, s, p, d)
        for size, k, s, p, d in zip(x.shape[2:], kernel, stride, padding, dilation, strict=True)
    )
    if any(size < 1 for size in out_size):
        raise ValueError(f"input {tuple(x.shape[2:])} is smaller than the dilated kernel {kernel}")
    return ConvShape(
        dims=dims,
        batch=x.shape[0],
        in_size=_triple(tuple(x.shape[2:]), 1),
        out_size=_triple(out_size, 1),
        kernel=_triple(kernel, 1),
        stride=_triple(stride, 1),
        padding=_triple(padding, 0),
        dilation=_triple(dilation, 1),
    )


def check_conv_operands(x: Tensor, weight: Tensor, named: dict[str, Tensor | None]) -> None:
    """Shapes and devices a launch relies on (values are the caller's; dtypes and groups, the op layer's)."""
    if x.dim() not in (3, 4, 5) or weight.dim() != x.dim():
        raise ValueError(
            f"x must be (N, C_in, *spatial) with 1-3 spatial dims and weight (C_out, C_in, *kernel) "
            f"of the same rank, got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    out_channels, in_channels = weight.shape[:2]
    if x.shape[1] != in_channels:
        raise ValueError(f"x has {x.shape[1]} channels but weight expects {in_channels}")
    if any(k % 2 == 0 for k in weight.shape[2:]):
        raise ValueError(f"kernel sizes must be odd (the adapter sits on the centre tap), got {tuple(weight.shape[2:])}")
    for name, t in {"weight": weight, **named}.items():
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}")
    lora_a, lora_b = named.get("lora_a"), named.get("lora_b")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together (or both None)")
    if lora_a is not None:
        rank = lora_a.shape[0]
        if lora_a.dim() != 2 or lora_a.shape[1] != in_channels or tuple(lora_b.shape) != (out_channels, rank):
            raise ValueError(
                f"lora_a must be (r, {in_channels}) and lora_b ({out_channels}, r), "
                f"got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}"
            )
    adapter = named.get("adapter")
    if adapter is not None and tuple(adapter.shape) != (out_channels, in_channels):
        raise ValueError(f"adapter must have shape ({out_channels}, {in_channels}), got {tuple(adapter.shape)}")
    bias = named.get("bias")
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(f"bias must have shape ({out_channels},), got {tuple(bias.shape)}")
