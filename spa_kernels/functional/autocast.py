"""Autocast for the SPA ops: cast the operands the way autocast casts those of ``F.linear``/``F.conv*``.

Inside ``torch.autocast(device_type, dtype)`` a matmul-like op computes in the
autocast dtype: its float32 (and other reduced-precision) operands are cast to it,
float64 ones are left alone.  The cast is an ordinary differentiable ``.to``, so
the gradients of the parameters come back in their own dtype.  It happens before
validation and backend choice, which then see the dtype the op computes in.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The dtypes autocast lowers; float64 stays float64 as in torch's own autocast.
_LOWERED = (torch.float32, torch.float16, torch.bfloat16)


def autocast_on(x: object) -> bool:
    """Whether autocast is on for ``x``'s device (False for a non-tensor, which validation then names).

    The common case, autocast off, asks only this: cheaper than passing every
    operand through :func:`autocast_operands`.
    """
    return isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type)


def autocast_operands(x: Tensor, *operands: Tensor | None) -> tuple[Tensor | None, ...]:
    """``(x, *operands)`` cast to the autocast dtype of ``x``'s device where autocast is on; as they are otherwise."""
    if not isinstance(x, Tensor):  # validation, which comes next, names the bad argument
        return (x, *operands)
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return (x, *operands)
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if t is not None and t.dtype in _LOWERED and t.dtype != dtype else t
        for t in (x, *operands)
    )


__all__ = ["autocast_on", "autocast_operands"]
