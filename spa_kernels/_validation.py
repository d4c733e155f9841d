"""Argument checks shared by every public entry point (DESIGN.md section 5).

Everything here runs before any kernel, so a bad call fails with a message that
names the argument instead of crashing or reading out of bounds.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(t: object, name: str, *, ndim: int | None = None, min_ndim: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
    return t


def check_float_tensor(t: Tensor, name: str, reference: Tensor, reference_name: str) -> None:
    """``t`` has the dtype and device of ``reference``, and that dtype is supported."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has unsupported dtype {t.dtype}; supported: {SUPPORTED_DTYPES}")
    if t.dtype != reference.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {reference_name} has {reference.dtype}")
    if t.device != reference.device:
        raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}")


def check_scale(scale: object) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def check_index(idx: object, name: str, size: int, device: torch.device) -> Tensor | None:
    """Validate an active-channel index list and return it as contiguous int64.

    ``None`` means every channel is active and is returned unchanged.  The
    checks of order and range read the values, so on a GPU they synchronise;
    modules avoid them by building their index lists from masks once.
    """
    if idx is None:
        return None
    if not isinstance(idx, Tensor):
        raise TypeError(f"{name} must be a 1-D int32/int64 tensor or None, got {type(idx).__name__}")
    if idx.dtype == torch.bool:
        raise TypeError(f"{name} must hold channel indices (int32/int64), not a bool mask; use torch.nonzero(mask).flatten()")
    if idx.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must have dtype int32 or int64, got {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{name} is on {idx.device} but the input is on {device}")
    if idx.numel() > 0:
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= size:
            raise IndexError(f"{name} holds indices in [{low}, {high}], outside [0, {size - 1}]")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError(f"{name} must be strictly increasing (sorted, no duplicates)")
    return idx.to(torch.int64).contiguous()


def check_mask(mask: object, name: str, size: int) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool, got {mask.dtype}")
    if mask.dim() != 1 or mask.numel() != size:
        raise ValueError(f"{name} must be a 1-D bool tensor of length {size}, got shape {tuple(mask.shape)}")
    return mask


def check_rank(rank: object, out_features: int) -> int:
    """Turn ``rank`` (int, or float in (0, 1) meaning a fraction of outputs) into an int."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Real):
        raise TypeError(f"rank must be an int or a float fraction, got {type(rank).__name__}")
    if not rank > 0:
        raise ValueError(f"rank must be positive, got {rank}")
    resolved = round(out_features * rank) if rank < 1 else round(rank)
    if resolved < 1:
        raise ValueError(f"rank={rank} gives a rank of 0 for {out_features} output channels")
    return int(resolved)


def check_splora_linear_args(x, weight, lora_a, lora_b, bias, in_idx, out_idx, scale):
    """Validate the arguments of ``splora_linear``; return normalised index lists and scale."""
    check_tensor(x, "x", min_ndim=1)
    check_tensor(weight, "weight", ndim=2)
    check_float_tensor(x, "x", x, "x")
    check_float_tensor(weight, "weight", x, "x")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but weight expects {in_features}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together (or both None)")
    if lora_a is not None:
        check_tensor(lora_a, "lora_a", ndim=2)
        check_tensor(lora_b, "lora_b", ndim=2)
        check_float_tensor(lora_a, "lora_a", x, "x")
        check_float_tensor(lora_b, "lora_b", x, "x")
        rank = lora_a.shape[0]
        if rank <= 0:
            raise ValueError(f"lora_a must have rank >= 1 rows, got shape {tuple(lora_a.shape)}")
        if lora_a.shape[1] != in_features:
            raise ValueError(f"lora_a must have shape (r, {in_features}), got {tuple(lora_a.shape)}")
        if tuple(lora_b.shape) != (out_features, rank):
            raise ValueError(f"lora_b must have shape ({out_features}, {rank}), got {tuple(lora_b.shape)}")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
        check_float_tensor(bias, "bias", x, "x")
        if bias.shape[0] != out_features:
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    in_idx = check_index(in_idx, "in_idx", in_features, x.device)
    out_idx = check_index(out_idx, "out_idx", out_features, x.device)
    return in_idx, out_idx, check_scale(scale)
