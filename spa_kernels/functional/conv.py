"""Functional convolutions: validate, choose a backend, call the op.

``splora_conv{1,2,3}d`` and ``sppara_conv{1,2,3}d``, and their ``*_trusted``
forms for modules.  Padding ``"same"``/``"valid"`` is resolved here to
explicit symmetric padding, so the ops and backends only ever see tuples of ints.

Grouped and depthwise convolutions (``groups > 1``) run only on backends whose
capabilities include them (the reference): with ``backend=None``/``"auto"``
they go there with a one-time warning, and any other backend asked for by name
(argument, ``use_backend`` or ``SPA_KERNELS_BACKEND``) raises a ``ValueError``.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .. import ops
from .._validation import check_splora_conv_args, check_sppara_conv_args
from ..backend import requested, resolve
from .autocast import autocast_on, autocast_operands

IntOrTuple = int | tuple[int, ...]

_grouped_warning_given = False


def _warn_grouped_once(groups: int) -> None:
    global _grouped_warning_given
    if _grouped_warning_given or torch.compiler.is_compiling():
        return
    _grouped_warning_given = True
    warnings.warn(
        f"grouped/depthwise convolutions (groups={groups}) run on the reference backend: "
        "the fused backends support groups=1 only",
        stacklevel=5,  # the caller of splora_conv*d / sppara_conv*d
    )


def _conv_backend(backend: str | None, x: Tensor, groups: int, op: str) -> str:
    impl = resolve(backend, x.device, x.dtype, op, groups)
    if groups != 1 and requested(backend) == "auto":
        _warn_grouped_once(groups)
    return impl.name


def _splora_conv(d, x, weight, lora_a, lora_b, bias, in_idx, out_idx, stride, padding, dilation, groups, scale,
                 backend, compact_input, compact_output, *, trusted=False) -> Tensor:
    if autocast_on(x):
        x, weight, lora_a, lora_b, bias = autocast_operands(x, weight, lora_a, lora_b, bias)
    in_idx, out_idx, stride, padding, dilation, groups, scale = check_splora_conv_args(
        d, x, weight, lora_a, lora_b, bias, in_idx, out_idx, stride, padding, dilation, groups, scale,
        trusted=trusted, compact_input=compact_input, compact_output=compact_output,
    )
    name = _conv_backend(backend, x, groups, "splora_conv")
    return ops.call(ops.splora_conv, x, weight, lora_a, lora_b, bias, in_idx, out_idx, list(stride), list(padding),
                    list(dilation), groups, scale, name, compact_input, compact_output)


def _sppara_conv(d, x, weight, adapter, bias, in_idx, out_idx, stride, padding, dilation, groups, backend,
                 compact_input, compact_output, *, trusted=False) -> Tensor:
    if autocast_on(x):
        x, weight, adapter, bias = autocast_operands(x, weight, adapter, bias)
    in_idx, out_idx, stride, padding, dilation, groups = check_sppara_conv_args(
        d, x, weight, adapter, bias, in_idx, out_idx, stride, padding, dilation, groups,
        trusted=trusted, compact_input=compact_input, compact_output=compact_output,
    )
    name = _conv_backend(backend, x, groups, "sppara_conv")
    return ops.call(ops.sppara_conv, x, weight, adapter, bias, in_idx, out_idx, list(stride), list(padding),
                    list(dilation), groups, name, compact_input, compact_output)


# --------------------------------------------------------------------------- SPLoRA

_SPLORA_DOC = r"""Masked SPLoRA {d}d convolution, computed over the active channels only.

    The low-rank adapter is added at the kernel's centre tap ``c``:

    .. math::
        W^{{eff}}_{{o,i,c}} = W_{{o,i,c}} + s\,(BA)_{{o,i}}, \qquad
        y_{{n,o}} = b_o + \sum_{{i \in S}} x_{{n,i}} \star W^{{eff}}_{{o,i}} \quad (o \in O),
        \qquad y_{{n,o}} = 0 \quad (o \notin O)

    Args:
        x: ``(N, C_in, {spatial})``.
        weight: ``(C_out, C_in/groups, {kernel})`` frozen base weight ``W``; every
            kernel size odd.
        lora_a: ``(r, C_in/groups)`` adapter ``A``; ``None`` with ``lora_b`` for the
            plain masked convolution.
        lora_b: ``(C_out, r)`` adapter ``B``.
        bias: ``(C_out,)`` or ``None``.
        in_idx: active input channels ``S`` of ``x``, strictly increasing
            int32/int64; ``None`` means all.
        out_idx: active output channels ``O``, likewise.
        stride, dilation: int or tuple of {d} ints, each >= 1.
        padding: int or tuple of {d} ints (symmetric zero padding), ``"same"``
            (stride 1 only) or ``"valid"``.
        groups: as in ``torch.nn.Conv{d}d``; ``groups > 1`` runs on the reference
            backend only (one warning under auto, ``ValueError`` on a fused
            backend asked for by name).  The adapter is then added per group, and a
            pruned input channel contributes nothing.
        scale: adapter scale ``s``.
        backend: ``None``/``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"``
            or ``"cuda"``.
        compact_input: ``x`` is ``(N, |S|, {spatial})``: channel ``k`` is input
            channel ``in_idx[k]`` (the weight is read in place, not gathered).
        compact_output: return ``(N, |O|, {spatial_out})``: channel ``j`` is output
            channel ``out_idx[j]``, and nothing is written for inactive outputs.

    Returns:
        ``(N, C_out, {spatial_out})``, exactly zero at inactive output channels
        (``(N, |O|, ...)`` with ``compact_output``).  The gradient of ``x`` has the
        shape of ``x``; parameter gradients are full, zero where inactive.
    """


def splora_conv1d(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor | None = None,
    lora_b: Tensor | None = None,
    bias: Tensor | None = None,
    in_idx: Tensor | None = None,
    out_idx: Tensor | None = None,
    *,
    stride: IntOrTuple = 1,
    padding: IntOrTuple | str = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    scale: float = 1.0,
    backend: str | None = None,
    compact_input: bool = False,
    compact_output: bool = False,
) -> Tensor:
    return _splora_conv(1, x, weight, lora_a, lora_b, bias, in_idx, out_idx, stride, padding, dilation, groups,
                        scale, backend,
                        compact_input, compact_output)


def splora_conv2d(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor | None = None,
    lora_b: Tensor | None = None,
    bias: Tensor | None = None,
    in_idx: Tensor | None = None,
    out_idx: Tensor | None = None,
    *,
    stride: IntOrTuple = 1,
    padding: IntOrTuple | str = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    scale: float = 1.0,
    backend: str | None = None,
    compact_input: bool = False,
    compact_output: bool = False,
) -> Tensor:
    return _splora_conv(2, x, weight, lora_a, lora_b, bias, in_idx, out_idx, stride, padding, dilation, groups,
                        scale, backend,
                        compact_input, compact_output)


def splora_conv3d(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor | None = None,
    lora_b: Tensor | None = None,
    bias: Tensor | None = None,
    in_idx: Tensor | None = None,
    out_idx: Tensor | None = None,
    *,
    stride: IntOrTuple = 1,
    padding: IntOrTuple | str = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    scale: float = 1.0,
    backend: str | None = None,
    compact_input: bool = False,
    compact_output: bool = False,
) -> Tensor:
    return _splora_conv(3, x, weight, lora_a, lora_b, bias, in_idx, out_idx, stride, padding, dilation, groups,
                        scale, backend,
                        compact_input, compact_output)


# --------------------------------------------------------------------------- SPPaRA

_SPPARA_DOC = r"""Masked SPPaRA {d}d convolution, computed over the active channels only.

    The full-rank adapter ``P`` is added at the kernel's centre tap ``c``:

    .. math::
        W^{{eff}}_{{o,i,c}} = W_{{o,i,c}} + P_{{o,i}}, \qquad
        y_{{n,o}} = b_o + \sum_{{i \in S}} x_{{n,i}} \star W^{{eff}}_{{o,i}} \quad (o \in O),
        \qquad y_{{n,o}} = 0 \quad (o \notin O)

    Args:
        x: ``(N, C_in, {spatial})``.
        weight: ``(C_out, C_in/groups, {kernel})`` frozen base weight ``W``; every
            kernel size odd.
        adapter: ``(C_out, C_in/groups)`` adapter ``P``.
        bias: ``(C_out,)`` or ``None``.
        in_idx: active input channels ``S`` of ``x``, strictly increasing
            int32/int64; ``None`` means all.
        out_idx: active output channels ``O``, likewise.
        stride, dilation: int or tuple of {d} ints, each >= 1.
        padding: int or tuple of {d} ints (symmetric zero padding), ``"same"``
            (stride 1 only) or ``"valid"``.
        groups: as in ``torch.nn.Conv{d}d``; ``groups > 1`` runs on the reference
            backend only (see :func:`splora_conv{d}d`).
        backend: ``None``/``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"``
            or ``"cuda"``.
        compact_input: ``x`` is ``(N, |S|, {spatial})``: channel ``k`` is input
            channel ``in_idx[k]`` (the weight is read in place, not gathered).
        compact_output: return ``(N, |O|, {spatial_out})``: channel ``j`` is output
            channel ``out_idx[j]``, and nothing is written for inactive outputs.

    Returns:
        ``(N, C_out, {spatial_out})``, exactly zero at inactive output channels
        (``(N, |O|, ...)`` with ``compact_output``).  The gradient of ``x`` has the
        shape of ``x``; parameter gradients are full, zero where inactive.
    """


def sppara_conv1d(
    x: Tensor,
    weight: Tensor,
    adapter: Tensor,
    bias: Tensor | None = None,
    in_idx: Tensor | None = None,
    out_idx: Tensor | None = None,
    *,
    stride: IntOrTuple = 1,
    padding: IntOrTuple | str = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    backend: str | None = None,
    compact_input: bool = False,
    compact_output: bool = False,
) -> Tensor:
    return _sppara_conv(1, x, weight, adapter, bias, in_idx, out_idx, stride, padding, dilation, groups, backend,
                        compact_input, compact_output)


def sppara_conv2d(
    x: Tensor,
    weight: Tensor,
    adapter: Tensor,
    bias: Tensor | None = None,
    in_idx: Tensor | None = None,
    out_idx: Tensor | None = None,
    *,
    stride: IntOrTuple = 1,
    padding: IntOrTuple | str = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    backend: str | None = None,
    compact_input: bool = False,
    compact_output: bool = False,
) -> Tensor:
    return _sppara_conv(2, x, weight, adapter, bias, in_idx, out_idx, stride, padding, dilation, groups, backend,
                        compact_input, compact_output)


def sppara_conv3d(
    x: Tensor,
    weight: Tensor,
    adapter: Tensor,
    bias: Tensor | None = None,
    in_idx: Tensor | None = None,
    out_idx: Tensor | None = None,
    *,
    stride: IntOrTuple = 1,
    padding: IntOrTuple | str = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    backend: str | None = None,
    compact_input: bool = False,
    compact_output: bool = False,
) -> Tensor:
    return _sppara_conv(3, x, weight, adapter, bias, in_idx, out_idx, stride, padding, dilation, groups, backend,
                        compact_input, compact_output)


_SHAPES = {1: ("L", "k"), 2: ("H, W", "kH, kW"), 3: ("D, H, W", "kD, kH, kW")}
for _d, (_spatial, _kernel) in _SHAPES.items():
    _out = ", ".join(f"{s}_out" for s in _spatial.split(", "))
    _fields = {"d": _d, "spatial": _spatial, "kernel": _kernel, "spatial_out": _out}
    globals()[f"splora_conv{_d}d"].__doc__ = _SPLORA_DOC.format(**_fields)
    globals()[f"sppara_conv{_d}d"].__doc__ = _SPPARA_DOC.format(**_fields)


# --------------------------------------------------------------------------- for modules


def splora_conv_trusted(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor | None = None,
    lora_b: Tensor | None = None,
    bias: Tensor | None = None,
    in_idx: Tensor | None = None,
    out_idx: Tensor | None = None,
    *,
    stride: IntOrTuple = 1,
    padding: IntOrTuple | str = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    scale: float = 1.0,
    backend: str | None = None,
    compact_input: bool = False,
    compact_output: bool = False,
) -> Tensor:
    """``splora_conv{1,2,3}d`` for modules, whose index lists are valid by construction.

    The dimensionality comes from ``weight``.  Shapes, dtypes and geometry are
    checked (host-side, no sync); the index checks that read values and the
    finiteness check of ``scale`` are skipped, so torch.compile traces it whole.
    ``lora_a`` and ``lora_b`` may also come as modules hold them, ``(1, r, in)``
    and ``(1, out, r)``.
    """
    return _splora_conv(None, x, weight, lora_a, lora_b, bias, in_idx, out_idx, stride, padding, dilation, groups,
                        scale, backend, compact_input, compact_output, trusted=True)


def sppara_conv_trusted(
    x: Tensor,
    weight: Tensor,
    adapter: Tensor,
    bias: Tensor | None = None,
    in_idx: Tensor | None = None,
    out_idx: Tensor | None = None,
    *,
    stride: IntOrTuple = 1,
    padding: IntOrTuple | str = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    backend: str | None = None,
    compact_input: bool = False,
    compact_output: bool = False,
) -> Tensor:
    """``sppara_conv{1,2,3}d`` for modules; see :func:`splora_conv_trusted`."""
    return _sppara_conv(None, x, weight, adapter, bias, in_idx, out_idx, stride, padding, dilation, groups, backend,
                        compact_input, compact_output, trusted=True)


__all__ = [
    "splora_conv1d",
    "splora_conv2d",
    "splora_conv3d",
    "splora_conv_trusted",
    "sppara_conv1d",
    "sppara_conv2d",
    "sppara_conv3d",
    "sppara_conv_trusted",
]
