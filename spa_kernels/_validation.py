"""Argument checks shared by every public entry point.

Everything here runs before any kernel, so a bad call fails with a message that
names the argument instead of crashing or reading out of bounds.

The checks run on every forward of every layer, so the common cases take a short
road first (exact ``int``/``tuple`` types, shapes read once); anything else goes
down the general path, which decides and words every error.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from . import _extension
from ._geometry import conv_output_size, conv_output_spatial

# The floating dtypes any entry point accepts; each backend declares the subset it
# runs in its Capabilities, and auto selection falls back to the reference for the rest.
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)
_INT64 = torch.int64


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
    if type(scale) is float and math.isfinite(scale):  # the common case, without the ABC check
        return scale
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
    dtype = idx.dtype
    if dtype is torch.bool:
        raise TypeError(f"{name} must hold channel indices (int32/int64), not a bool mask; use torch.nonzero(mask).flatten()")
    if dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must have dtype int32 or int64, got {dtype}")
    if idx.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{name} is on {idx.device} but the input is on {device}")
    if torch.compiler.is_compiling():
        _assert_index_in_graph(idx, name, size)
    elif idx.numel() > 0:
        low, high, increasing = _index_range_and_order(idx)
        if low < 0 or high >= size:
            raise IndexError(f"{name} holds indices in [{low}, {high}], outside [0, {size - 1}]")
        if not increasing:
            raise ValueError(f"{name} must be strictly increasing (sorted, no duplicates)")
    return _unchecked_index(idx)


def _assert_index_in_graph(idx: Tensor, name: str, size: int) -> None:
    """The range and order checks as graph ops: traced by torch.compile, raised when the graph runs."""
    in_range = ((idx >= 0) & (idx < size)).all()
    increasing = (idx[1:] > idx[:-1]).all()
    torch._assert_async(in_range, f"{name} holds indices outside [0, {size - 1}]")
    torch._assert_async(increasing, f"{name} must be strictly increasing (sorted, no duplicates)")


def _index_range_and_order(idx: Tensor) -> tuple[int, int, bool]:
    """(smallest, largest, strictly increasing) of a non-empty index list.

    On the CPU one call into the compiled extension reads the values (through
    NumPy where the extension is not built): microseconds where the same torch
    ops cost tens, and far fewer with the caches cold, as they are after a
    large layer.  Elsewhere the three answers come back in one transfer.
    """
    if idx.device.type == "cpu":
        return _range_and_order_on_host(idx)
    return _range_and_order_on_device(idx)


def _range_and_order_on_host(idx: Tensor) -> tuple[int, int, bool]:
    if _extension.index_bounds is not None:
        return _extension.index_bounds(idx)
    return _range_and_order_with_numpy(idx)


def _range_and_order_with_numpy(idx: Tensor) -> tuple[int, int, bool]:
    values = idx.numpy()
    increasing = values.size == 1 or bool((values[1:] > values[:-1]).all())
    if increasing:
        return int(values[0]), int(values[-1]), True
    return int(values.min()), int(values.max()), False


def _range_and_order_on_device(idx: Tensor) -> tuple[int, int, bool]:
    increasing = (idx[1:] > idx[:-1]).all().to(idx.dtype)
    low, high, increasing = torch.stack((idx.min(), idx.max(), increasing)).tolist()
    return low, high, bool(increasing)


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


def check_compact_flags(compact_input: object, compact_output: object) -> None:
    for name, flag in (("compact_input", compact_input), ("compact_output", compact_output)):
        if type(flag) is not bool:
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")


def check_compact_width(x: Tensor, dim: int, in_idx: Tensor | None, in_channels: int) -> None:
    """With ``compact_input``: ``x`` holds exactly the active inputs on ``dim``."""
    expected = in_channels if in_idx is None else in_idx.shape[0]
    if x.shape[dim] != expected:
        active = "every input channel is active" if in_idx is None else f"in_idx lists {expected} active inputs"
        raise ValueError(
            f"x has {x.shape[dim]} channels in dimension {dim % x.dim()} but compact_input=True and {active}, "
            f"so x must have {expected}"
        )


def check_splora_linear_args(x, weight, lora_a, lora_b, bias, in_idx, out_idx, scale,
                             compact_input=False, compact_output=False):
    """Validate the arguments of ``splora_linear``; return normalised index lists and scale.

    With ``compact_input`` the last dimension of ``x`` holds the active inputs only.
    """
    check_tensor(x, "x", min_ndim=1)
    check_tensor(weight, "weight", ndim=2)
    check_float_tensor(x, "x", x, "x")
    check_float_tensor(weight, "weight", x, "x")
    check_compact_flags(compact_input, compact_output)
    out_features, in_features = weight.shape
    if not compact_input and x.shape[-1] != in_features:
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
    if compact_input:
        check_compact_width(x, -1, in_idx, in_features)
    return in_idx, out_idx, check_scale(scale)


# --------------------------------------------------------------------------- convolutions

PADDING_MODES = ("same", "valid")


def _int_tuple(value: object, name: str, d: int) -> tuple[int, ...]:
    """An int, or a tuple/list of ``d`` ints, as a tuple of ``d`` Python ints."""
    if type(value) is tuple and len(value) == d:  # what modules pass: nothing to convert
        for item in value:
            if type(item) is not int:
                break
        else:
            return value
    elif type(value) is int:
        return (value,) * d
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (int(value),) * d
    if isinstance(value, (tuple, list)):
        if len(value) != d:
            raise ValueError(f"{name} must be an int or a tuple of {d} ints, got {tuple(value)!r}")
        for item in value:
            if isinstance(item, bool) or not isinstance(item, numbers.Integral):
                raise TypeError(f"{name} must hold ints, got {type(item).__name__} in {tuple(value)!r}")
        return tuple(int(item) for item in value)
    raise TypeError(f"{name} must be an int or a tuple of {d} ints, got {type(value).__name__}")


def check_groups(groups: object) -> int:
    if type(groups) is int and groups >= 1:
        return groups
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"groups must be an int, got {type(groups).__name__}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    return int(groups)


def check_conv_geometry(
    stride: object, padding: object, dilation: object, kernel: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Normalise stride, padding and dilation to tuples of ``len(kernel)`` ints.

    ``padding`` may be ``"same"`` (stride 1 only, as in torch) or ``"valid"``;
    both become explicit symmetric paddings, exact because kernels are odd.
    """
    d = len(kernel)
    stride = _int_tuple(stride, "stride", d)
    dilation = _int_tuple(dilation, "dilation", d)
    if min(stride) < 1:
        raise ValueError(f"stride must be >= 1 in every dimension, got {stride}")
    if min(dilation) < 1:
        raise ValueError(f"dilation must be >= 1 in every dimension, got {dilation}")
    if isinstance(padding, str):
        if padding not in PADDING_MODES:
            raise ValueError(f"padding must be an int, a tuple of {d} ints, 'same' or 'valid', got {padding!r}")
        if padding == "valid":
            return stride, (0,) * d, dilation
        if max(stride) != 1:
            raise ValueError(f"padding='same' needs stride 1 in every dimension (as in torch), got stride={stride}")
        return stride, tuple(dil * (k - 1) // 2 for k, dil in zip(kernel, dilation, strict=True)), dilation
    padding = _int_tuple(padding, "padding", d)
    if min(padding) < 0:
        raise ValueError(f"padding must be >= 0 in every dimension, got {padding}")
    return stride, padding, dilation


def _check_conv_tensors(d: int | None, x: object, weight: object, bias: object, groups: object,
                        compact_input: bool = False) -> tuple[int, int]:
    """Shapes, dtypes and devices of x, weight, bias; returns (d, groups).

    With ``compact_input`` the channels of ``x`` are checked later, against ``in_idx``.
    """
    check_tensor(weight, "weight")
    if d is None:  # trusted callers: the dimensionality comes from the weight
        d = weight.dim() - 2
        if d not in (1, 2, 3):
            raise ValueError(f"weight must be 3-D, 4-D or 5-D (C_out, C_in/groups, *kernel), got shape {tuple(weight.shape)}")
    check_tensor(x, "x")
    if x.dim() != d + 2:
        raise ValueError(f"x must be {d + 2}-D (N, C_in, *{d} spatial dims) for a {d}d convolution, got shape {tuple(x.shape)}")
    if weight.dim() != d + 2:
        raise ValueError(
            f"weight must be {d + 2}-D (C_out, C_in/groups, *{d} kernel dims) for a {d}d convolution, "
            f"got shape {tuple(weight.shape)}"
        )
    check_float_tensor(x, "x", x, "x")
    check_float_tensor(weight, "weight", x, "x")
    groups = check_groups(groups)
    x_shape, w_shape = x.shape, weight.shape
    out_channels, in_channels = w_shape[0], w_shape[1] * groups if compact_input else x_shape[1]
    if out_channels < 1 or w_shape[1] < 1:
        raise ValueError(
            f"weight must have at least one output and one input channel, got shape {tuple(w_shape)}"
        )
    for k in w_shape[2:]:
        if k % 2 == 0:
            raise ValueError(
                f"weight has kernel size {tuple(w_shape[2:])}; every kernel size must be odd, "
                "because the adapter sits at the kernel's centre tap"
            )
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"groups={groups} must divide both the input channels ({in_channels}) and the output channels ({out_channels})"
        )
    if w_shape[1] * groups != in_channels:
        raise ValueError(
            f"x has {in_channels} channels but weight of shape {tuple(w_shape)} with groups={groups} "
            f"expects {w_shape[1] * groups}"
        )
    if min(x_shape[2:]) < 1:
        raise ValueError(f"x must have non-empty spatial dimensions, got shape {tuple(x_shape)}")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
        check_float_tensor(bias, "bias", x, "x")
        if bias.shape[0] != out_channels:
            raise ValueError(f"bias must have shape ({out_channels},), got {tuple(bias.shape)}")
    return d, groups


def _check_output_size(x: Tensor, weight: Tensor, stride, padding, dilation) -> None:
    x_shape, kernel = x.shape, weight.shape
    for i in range(len(stride)):
        if conv_output_size(x_shape[i + 2], kernel[i + 2], stride[i], padding[i], dilation[i]) < 1:
            break
    else:
        return
    kernel = tuple(weight.shape[2:])
    sizes = tuple(conv_output_spatial(x, weight, stride, padding, dilation))
    if min(sizes) < 1:
        raise ValueError(
            f"x of spatial size {tuple(x.shape[2:])} is too small for kernel {kernel} with padding={padding}, "
            f"dilation={dilation}, stride={stride}: the output size would be {sizes}"
        )


def _unchecked_index(idx: Tensor | None) -> Tensor | None:
    """Trusted index lists: only made int64 and contiguous, no value is read."""
    if idx is None or (idx.dtype is _INT64 and idx.is_contiguous()):  # a module's, as built
        return idx
    return idx.to(torch.int64).contiguous()


def _check_conv_indices(x: Tensor, weight: Tensor, groups: int, in_idx, out_idx, trusted: bool, compact_input: bool):
    in_channels = weight.shape[1] * groups
    if trusted:
        in_idx, out_idx = _unchecked_index(in_idx), _unchecked_index(out_idx)
    else:
        in_idx = check_index(in_idx, "in_idx", in_channels, x.device)
        out_idx = check_index(out_idx, "out_idx", weight.shape[0], x.device)
    if compact_input:
        check_compact_width(x, 1, in_idx, in_channels)
    return in_idx, out_idx


# The C++ form of _module_conv_call_is_valid; None where the extension is not built.
_conv_call_is_valid = getattr(_extension.extension, "conv_call_is_valid", None)


def _module_conv_call_is_valid(x, weight, bias, adapters, adapter_shapes, stride, padding, dilation,
                               groups) -> bool:
    """Whether a module's convolution call is certainly valid, judged on its common case alone.

    That case: exact ``int`` tuples for the geometry, as modules pass them, ``groups=1``,
    ``x`` of the weight's dimensionality, channels, dtype and device, operands of the
    weight's dtype, device and expected shapes, odd kernels and an output at least one
    wide.  Anything else, every error included, returns False and goes down the general
    path, which words the error; so this adds no rule, it only decides sooner.

    Where the extension is built the same check runs in C++ (``conv_call_is_valid``):
    in Python it costs about 5 µs, a third of a small layer's whole call.
    """
    if torch.compiler.is_compiling():
        return False
    if _conv_call_is_valid is not None:
        return _conv_call_is_valid(x, weight, bias, adapters, adapter_shapes, stride, padding, dilation, groups)
    if groups != 1 or type(groups) is not int or not isinstance(x, Tensor):
        return False
    x_shape, w_shape = x.shape, weight.shape
    d = len(w_shape) - 2
    if len(x_shape) != d + 2 or x_shape[1] != w_shape[1] or w_shape[0] < 1 or w_shape[1] < 1:
        return False
    dtype, device = weight.dtype, weight.device
    if x.dtype is not dtype or dtype not in SUPPORTED_DTYPES or x.device != device:
        return False
    operands, shapes = adapters, adapter_shapes
    if bias is not None:
        operands, shapes = (*adapters, bias), (*adapter_shapes, (w_shape[0],))
    for operand, shape in zip(operands, shapes, strict=True):
        if (not isinstance(operand, Tensor) or operand.dtype is not dtype or operand.device != device
                or operand.shape != shape):
            return False
    for geometry in (stride, padding, dilation):
        if type(geometry) is not tuple or len(geometry) != d:
            return False
        for value in geometry:
            if type(value) is not int:
                return False
    for size, kernel, st, pad, dil in zip(x_shape[2:], w_shape[2:], stride, padding, dilation, strict=True):
        if kernel % 2 == 0 or st < 1 or pad < 0 or dil < 1 or conv_output_size(size, kernel, st, pad, dil) < 1:
            return False
    return True


def check_splora_conv_args(
    d, x, weight, lora_a, lora_b, bias, in_idx, out_idx, stride, padding, dilation, groups, scale,
    *, trusted: bool = False, compact_input: bool = False, compact_output: bool = False,
):
    """Validate a SPLoRA convolution call (``d=None``: take it from the weight).

    Returns ``(in_idx, out_idx, stride, padding, dilation, groups, scale)`` with
    int64 index lists, explicit symmetric padding and a float scale.
    ``trusted=True`` (modules) skips the checks that read index values, and the
    scale check, which cannot be traced when torch.compile makes it symbolic.
    With ``compact_input`` dimension 1 of ``x`` holds the active inputs only.
    """
    # A module passes its factors as it holds them, (1, r, in) and (1, out, r) (ops.library.factor).
    if (trusted and compact_input is False and compact_output is False and d is None and isinstance(weight, Tensor)
            and isinstance(lora_a, Tensor)):
        w_shape, a_shape = weight.shape, lora_a.shape
        if len(w_shape) >= 2 and len(a_shape) in (2, 3):
            rank = a_shape[-2]
            if len(a_shape) == 3:
                shapes = ((1, rank, w_shape[1]), (1, w_shape[0], rank))
            else:
                shapes = ((rank, w_shape[1]), (w_shape[0], rank))
            if rank >= 1 and _module_conv_call_is_valid(x, weight, bias, (lora_a, lora_b), shapes, stride, padding,
                                                        dilation, groups):
                in_idx, out_idx = _check_conv_indices(x, weight, groups, in_idx, out_idx, trusted, False)
                return in_idx, out_idx, stride, padding, dilation, groups, float(scale)
    held = trusted and isinstance(lora_a, Tensor) and lora_a.dim() == 3
    check_compact_flags(compact_input, compact_output)
    if held and (lora_a.shape[0] != 1 or not (isinstance(lora_b, Tensor) and lora_b.dim() == 3
                                              and lora_b.shape[0] == 1)):
        raise ValueError("a module's lora_a and lora_b must be (1, r, in) and (1, out, r), got "
                         f"{tuple(lora_a.shape)} and {tuple(getattr(lora_b, 'shape', ()))}")
    d, groups = _check_conv_tensors(d, x, weight, bias, groups, compact_input)
    out_channels, group_in = weight.shape[0], weight.shape[1]
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together (or both None)")
    if lora_a is not None:
        # A module's factors are checked as the 2-D matrices they hold, without a view per call.
        factor_dims = 3 if held else 2
        check_tensor(lora_a, "lora_a", ndim=factor_dims)
        check_tensor(lora_b, "lora_b", ndim=factor_dims)
        check_float_tensor(lora_a, "lora_a", x, "x")
        check_float_tensor(lora_b, "lora_b", x, "x")
        a_shape, b_shape = tuple(lora_a.shape[-2:]), tuple(lora_b.shape[-2:])
        rank = a_shape[0]
        if rank <= 0:
            raise ValueError(f"lora_a must have rank >= 1 rows, got shape {tuple(lora_a.shape)}")
        if a_shape[1] != group_in:
            raise ValueError(f"lora_a must have shape (r, C_in/groups) = (r, {group_in}), got {tuple(lora_a.shape)}")
        if b_shape != (out_channels, rank):
            raise ValueError(f"lora_b must have shape ({out_channels}, {rank}), got {tuple(lora_b.shape)}")
    stride, padding, dilation = check_conv_geometry(stride, padding, dilation, tuple(weight.shape[2:]))
    _check_output_size(x, weight, stride, padding, dilation)
    in_idx, out_idx = _check_conv_indices(x, weight, groups, in_idx, out_idx, trusted, compact_input)
    return in_idx, out_idx, stride, padding, dilation, groups, float(scale) if trusted else check_scale(scale)


def check_sppara_conv_args(
    d, x, weight, adapter, bias, in_idx, out_idx, stride, padding, dilation, groups,
    *, trusted: bool = False, compact_input: bool = False, compact_output: bool = False,
):
    """Validate an SPPaRA convolution call; like :func:`check_splora_conv_args` without scale."""
    if (trusted and compact_input is False and compact_output is False and d is None and isinstance(weight, Tensor)
            and weight.dim() >= 2):
        shapes = ((weight.shape[0], weight.shape[1]),)
        if _module_conv_call_is_valid(x, weight, bias, (adapter,), shapes, stride, padding, dilation, groups):
            return (*_check_conv_indices(x, weight, groups, in_idx, out_idx, trusted, False), stride, padding,
                    dilation, groups)
    check_compact_flags(compact_input, compact_output)
    d, groups = _check_conv_tensors(d, x, weight, bias, groups, compact_input)
    check_tensor(adapter, "adapter", ndim=2)
    check_float_tensor(adapter, "adapter", x, "x")
    expected = (weight.shape[0], weight.shape[1])
    if tuple(adapter.shape) != expected:
        raise ValueError(f"adapter must have shape (C_out, C_in/groups) = {expected}, got {tuple(adapter.shape)}")
    stride, padding, dilation = check_conv_geometry(stride, padding, dilation, tuple(weight.shape[2:]))
    _check_output_size(x, weight, stride, padding, dilation)
    in_idx, out_idx = _check_conv_indices(x, weight, groups, in_idx, out_idx, trusted, compact_input)
    return in_idx, out_idx, stride, padding, dilation, groups
