"""Functional SPLoRA linear: validate, choose a backend, call the op."""

from __future__ import annotations

from torch import Tensor

from .. import ops
from .._validation import check_compact_flags, check_compact_width, check_splora_linear_args
from ..backend import resolve
from .autocast import autocast_on, autocast_operands


def splora_linear(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor | None = None,
    lora_b: Tensor | None = None,
    bias: Tensor | None = None,
    in_idx: Tensor | None = None,
    out_idx: Tensor | None = None,
    *,
    scale: float = 1.0,
    backend: str | None = None,
    compact_input: bool = False,
    compact_output: bool = False,
) -> Tensor:
    r"""Masked SPLoRA linear layer, computed over the active channels only.

    .. math::
        y_{\dots,o} = b_o + \sum_{i \in S} x_{\dots,i}\,(W_{o,i} + s\,(BA)_{o,i})
        \quad (o \in O), \qquad y_{\dots,o} = 0 \quad (o \notin O)

    Args:
        x: ``(..., in)``.
        weight: ``(out, in)`` frozen base weight ``W``.
        lora_a: ``(r, in)`` adapter ``A``; ``None`` with ``lora_b`` for the plain
            masked layer.
        lora_b: ``(out, r)`` adapter ``B``.
        bias: ``(out,)`` or ``None``.
        in_idx: active input channels ``S``, strictly increasing int32/int64;
            ``None`` means all.
        out_idx: active output channels ``O``, likewise.
        scale: adapter scale ``s``.
        backend: ``None``/``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"``
            or ``"cuda"``.
        compact_input: ``x`` is ``(..., |S|)``: column ``k`` is input channel
            ``in_idx[k]`` (the weight is read in place, not gathered).
        compact_output: return ``(..., |O|)``: column ``j`` is output channel
            ``out_idx[j]``, and nothing is written for inactive outputs.

    Returns:
        ``(..., out)``, exactly zero at inactive outputs (``(..., |O|)`` with
        ``compact_output``).  Gradients keep the shapes of their operands: compact
        for ``x`` with ``compact_input``, full (zero where inactive) for the
        parameters.  Under ``torch.autocast`` the operands are cast to the autocast
        dtype first, as for ``F.linear``.
    """
    if autocast_on(x):
        x, weight, lora_a, lora_b, bias = autocast_operands(x, weight, lora_a, lora_b, bias)
    in_idx, out_idx, scale = check_splora_linear_args(
        x, weight, lora_a, lora_b, bias, in_idx, out_idx, scale, compact_input, compact_output
    )
    impl = resolve(backend, x.device, x.dtype, "splora_linear")
    return ops.call(
        ops.splora_linear, x, weight, lora_a, lora_b, bias, in_idx, out_idx, scale, impl.name, compact_input,
        compact_output,
    )


def splora_linear_trusted(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    bias: Tensor | None,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    scale: float,
    backend: str | None,
    compact_input: bool = False,
    compact_output: bool = False,
) -> Tensor:
    """``splora_linear`` for modules, whose index lists are valid by construction.

    Skips the index checks that read values (a host sync on GPUs); shapes are
    still the caller's responsibility to keep consistent.  ``lora_a`` and
    ``lora_b`` may also come as modules hold them, ``(1, r, in)`` and ``(1, out, r)``.
    """
    if autocast_on(x):
        x, weight, lora_a, lora_b, bias = autocast_operands(x, weight, lora_a, lora_b, bias)
    if compact_input or compact_output:
        check_compact_flags(compact_input, compact_output)
        if compact_input:
            check_compact_width(x, -1, in_idx, weight.shape[1])
    if not compact_input and x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but weight expects {weight.shape[1]}")
    dtype = x.dtype
    if dtype is not weight.dtype:
        raise TypeError(f"x has dtype {dtype} but weight has {weight.dtype}")
    impl = resolve(backend, x.device, dtype, "splora_linear")
    return ops.call(
        ops.splora_linear, x, weight, lora_a, lora_b, bias, in_idx, out_idx, float(scale), impl.name, compact_input,
        compact_output,
    )


__all__ = ["splora_linear", "splora_linear_trusted"]
