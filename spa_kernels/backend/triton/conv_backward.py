r"""Masked SPLoRA / SPPaRA convolution in Triton: the backward pass.

Math (``dy`` = grad of y, (N, C_out, *out); ``x_c`` = x read at the centre tap,
i.e. ``x[n, :, p·stride + c·dilation − padding]``; sums over n and output positions p)::

    u[n, :, p] = s · B_Oᵀ dy_O[n, :, p]            (r × positions, fp32)
    t[n, :, p] = s · A_S x_c,S[n, :, p]            (r × positions, fp32)

    dx[:, S]   = transposed conv of dy_O with W_OS, + the centre tap of u A_S (SPLoRA)
                 or of dy_O P_OS (SPPaRA)                 implicit GEMM, TRANSPOSED
    dA[:, S]   = Σ u x_c,Sᵀ                             = s Σ (B_Oᵀ dy_O) x_c,Sᵀ
    dB[O, :]   = Σ dy_O tᵀ                              = s Σ dy_O (A_S x_c,S)ᵀ
    dP[O, S]   = Σ dy_O x_c,Sᵀ
    db[O]      = Σ dy_O
    dW[O, S]   = Σ dy_O x_tap,Sᵀ for every tap            only when asked (masked fine-tuning)

and zero at every pruned entry.  ``u`` and ``t`` come from the forward
implicit-GEMM kernel run with a single tap (``conv_rank_product``).  The
weight-shaped gradients are one kernel, ``splora_conv_weight_grad_kernel``::

    out[l_idx[i], r_idx[j], tap] = Σ_{n,p} left[n, l_idx[i], p] · right[n, r_idx[j], p·stride + tap·dilation − padding]

dW: left = dy, right = x, every tap.  dP: left = dy, right = x, the centre tap
only.  dB: left = dy, right = t, a 1×1 stride-1 tap.  dA: left = u, right = x,
the centre tap.  Its programs tile the active (i, j) block, one grid slice per
tap.  When it reads dy, the programs of the first j-tile and first tap also sum
their dy tiles into db; otherwise ``splora_conv_bias_grad_kernel`` does that alone.

Pruned entries are zeros from ``torch.zeros`` (one memset per gradient that has
any); gradients whose every entry is active are allocated uninitialised.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .conv import conv_rank_product, implicit_gemm, in_bounds, split_rows
from .conv_geometry import ConvShape, as_5d, check_conv_operands, conv_shape
from .linear import (
    GROUP_M,
    INTERPRETED,
    active_columns,
    active_count,
    dot_precision,
    index_list,
    mma,
    new_output,
    on_device,
    prune_configs,
    round_to,
    tile_configs,
    tile_coordinates,
)


def _weight_grad_configs() -> list[triton.Config]:
    # (BLOCK_LEFT, BLOCK_RIGHT, BLOCK_M, warps, stages): square tiles for dW and
    # dP, narrow ones for dA and dB, whose right (or left) side is rank-r wide.
    shapes = [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 3),
        (64, 128, 64, 4, 3),
        (64, 64, 64, 4, 4),
        (128, 32, 64, 4, 4),
        (32, 128, 64, 4, 4),
        (64, 16, 128, 4, 3),
        (16, 64, 128, 4, 3),
    ]
    # In the interpreter, 8-wide channel blocks and 32-row steps, as for the implicit GEMM.
    return tile_configs(("BLOCK_LEFT", "BLOCK_RIGHT", "BLOCK_M"), shapes, interpreted=(8, 8, 32))


# Channel sums read dy once and do no math worth tiling for.
BIAS_GRAD_BLOCK_N = 8 if INTERPRETED else 32
BIAS_GRAD_BLOCK_M = 32 if INTERPRETED else 256


# ---------------------------------------------------------------------------- kernels


@triton.autotune(
    configs=_weight_grad_configs(),
    key=["M", "N_LEFT", "N_RIGHT", "TAPS", "SPATIAL_DIMS"],
    prune_configs_by={"early_config_prune": prune_configs({"BLOCK_LEFT": "N_LEFT", "BLOCK_RIGHT": "N_RIGHT"})},
)
@triton.jit
def splora_conv_weight_grad_kernel(
    left_ptr, right_ptr, left_idx_ptr, right_idx_ptr, out_ptr, column_sum_ptr,
    M, N_LEFT, N_RIGHT, TAPS,
    OUT_D, OUT_H, OUT_W,
    SRC_D, SRC_H, SRC_W,
    KERNEL_H, KERNEL_W,
    CONV_STRIDE_D, CONV_STRIDE_H, CONV_STRIDE_W,
    PAD_D, PAD_H, PAD_W,
    DIL_D, DIL_H, DIL_W,
    stride_left_n, stride_left_c, stride_left_d, stride_left_h, stride_left_w,
    stride_right_n, stride_right_c, stride_right_d, stride_right_h, stride_right_w,
    stride_out_i, stride_out_j, stride_out_d, stride_out_h, stride_out_w,
    SPATIAL_DIMS: tl.constexpr,
    HAS_LEFT_IDX: tl.constexpr,
    HAS_RIGHT_IDX: tl.constexpr,
    COLUMN_SUM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    IN_INTERPRETER: tl.constexpr,
    BLOCK_LEFT: tl.constexpr,
    BLOCK_RIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP: tl.constexpr,
):
    """out[l_idx[i], r_idx[j], tap] = Σ_{n,p} left[n, l_idx[i], p] right[n, r_idx[j], p·stride + tap·dil − pad].

    M = N·OUT_D·OUT_H·OUT_W rows (left's positions, the output grid), N_LEFT = |l_idx|,
    N_RIGHT = |r_idx|; program_id(1) is the tap.  With COLUMN_SUM,
    column_sum[l_idx[i]] = Σ_{n,p} left[n, l_idx[i], p] as well.  Either operand may
    be fp32 while the output is 16-bit: it is rounded to the output's dtype first.
    """
    pid_left, pid_right = tile_coordinates(tl.program_id(0), N_LEFT, N_RIGHT, BLOCK_LEFT, BLOCK_RIGHT, GROUP)
    tap = tl.program_id(1)
    k_w = tap % KERNEL_W
    k_h = (tap // KERNEL_W) % KERNEL_H
    k_d = tap // (KERNEL_W * KERNEL_H)
    # Output position p reads right at p·stride + shift.
    shift_d = k_d * DIL_D - PAD_D
    shift_h = k_h * DIL_H - PAD_H
    shift_w = k_w * DIL_W - PAD_W
    left_channels, left_ok = active_columns(left_idx_ptr, pid_left * BLOCK_LEFT, N_LEFT, BLOCK_LEFT, HAS_LEFT_IDX)
    right_channels, right_ok = active_columns(right_idx_ptr, pid_right * BLOCK_RIGHT, N_RIGHT, BLOCK_RIGHT, HAS_RIGHT_IDX)
    left_columns = left_ptr + left_channels[:, None] * stride_left_c
    right_columns = right_ptr + (
        shift_d * stride_right_d + shift_h * stride_right_h + shift_w * stride_right_w
    ) + right_channels[None, :] * stride_right_c

    acc = tl.zeros((BLOCK_LEFT, BLOCK_RIGHT), dtype=tl.float32)
    column_sum = tl.zeros((BLOCK_LEFT,), dtype=tl.float32)
    for start in range(0, M, BLOCK_M):
        rows = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = rows < M
        n, p_d, p_h, p_w = split_rows(rows, OUT_D, OUT_H, OUT_W)
        s_d = p_d * CONV_STRIDE_D
        s_h = p_h * CONV_STRIDE_H
        s_w = p_w * CONV_STRIDE_W
        source_ok = in_bounds(row_ok, s_d + shift_d, s_h + shift_h, s_w + shift_w, SRC_D, SRC_H, SRC_W, SPATIAL_DIMS)
        left_rows = n * stride_left_n + p_d * stride_left_d + p_h * stride_left_h + p_w * stride_left_w
        right_rows = n * stride_right_n + s_d * stride_right_d + s_h * stride_right_h + s_w * stride_right_w
        # Loaded already transposed (channels × rows): the dot wants leftᵀ.
        left = tl.load(left_columns + left_rows[None, :], mask=left_ok[:, None] & row_ok[None, :], other=0.0)
        right = tl.load(right_columns + right_rows[:, None], mask=source_ok[:, None] & right_ok[None, :], other=0.0)
        acc = mma(
            round_to(left, out_ptr.dtype.element_ty, IN_INTERPRETER),
            round_to(right, out_ptr.dtype.element_ty, IN_INTERPRETER),
            acc, INPUT_PRECISION, IN_INTERPRETER,
        )
        if COLUMN_SUM:
            column_sum += tl.sum(left.to(tl.float32), axis=1)

    tap_offset = k_d * stride_out_d + k_h * stride_out_h + k_w * stride_out_w
    tl.store(
        out_ptr + tap_offset + left_channels[:, None] * stride_out_i + right_channels[None, :] * stride_out_j,
        round_to(acc, out_ptr.dtype.element_ty, IN_INTERPRETER),
        mask=left_ok[:, None] & right_ok[None, :],
    )
    # One program per left tile writes the column sums (a scalar branch: see
    # splora_gathered_tn_kernel).
    if COLUMN_SUM:
        if (pid_right == 0) & (tap == 0):
            tl.store(
                column_sum_ptr + left_channels,
                round_to(column_sum, column_sum_ptr.dtype.element_ty, IN_INTERPRETER),
                mask=left_ok,
            )


@triton.jit
def splora_conv_bias_grad_kernel(
    grad_ptr, idx_ptr, out_ptr,
    M, N, POSITIONS,
    stride_grad_n, stride_grad_c,
    HAS_IDX: tl.constexpr,
    IN_INTERPRETER: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """out[idx[c]] = Σ_{n,p} grad[n, idx[c], p]   (N = |idx|, M = batch·POSITIONS; positions contiguous)."""
    channels, channel_ok = active_columns(idx_ptr, tl.program_id(0) * BLOCK_N, N, BLOCK_N, HAS_IDX)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, M, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows = rows.to(tl.int64)
        offsets = (rows // POSITIONS) * stride_grad_n + rows % POSITIONS
        grad = tl.load(
            grad_ptr + channels[:, None] * stride_grad_c + offsets[None, :],
            mask=channel_ok[:, None] & row_ok[None, :], other=0.0,
        )
        total += tl.sum(grad.to(tl.float32), axis=1)
    tl.store(out_ptr + channels, round_to(total, out_ptr.dtype.element_ty, IN_INTERPRETER), mask=channel_ok)


# ---------------------------------------------------------------------------- launchers


def weight_grad(
    left: Tensor,
    left_idx: Tensor | None,
    right: Tensor,
    right_idx: Tensor | None,
    out: Tensor,
    shape: ConvShape,
    column_sum: Tensor | None = None,
) -> None:
    """Write ``Σ_{n,p} left[n, l, p] right[n, r, pos(p, tap)]`` into ``out[l, r, tap]`` (and
    ``Σ left[n, l, p]`` into ``column_sum[l]``).

    left (N, I_full, *shape.out_size), right (N, J_full, *shape.in_size),
    out (I_full, J_full, *shape.kernel); all 5-D, any strides.
    """
    i_count = active_count(left_idx, left.shape[1])
    j_count = active_count(right_idx, right.shape[1])
    rows = shape.batch * shape.out_positions
    if i_count == 0 or j_count == 0 or rows == 0:
        return
    placeholder = out

    def grid(meta):
        return (triton.cdiv(i_count, meta["BLOCK_LEFT"]) * triton.cdiv(j_count, meta["BLOCK_RIGHT"]), shape.taps)

    with on_device(left):
        splora_conv_weight_grad_kernel[grid](
            left, right,
            left_idx if left_idx is not None else placeholder,
            right_idx if right_idx is not None else placeholder,
            out,
            column_sum if column_sum is not None else placeholder,
            rows, i_count, j_count, shape.taps,
            *shape.out_size, *shape.in_size, *shape.kernel[1:],
            *shape.stride, *shape.padding, *shape.dilation,
            *left.stride(), *right.stride(), *out.stride(),
            SPATIAL_DIMS=shape.dims,
            HAS_LEFT_IDX=left_idx is not None,
            HAS_RIGHT_IDX=right_idx is not None,
            COLUMN_SUM=column_sum is not None,
            INPUT_PRECISION=dot_precision(out.dtype),
            IN_INTERPRETER=INTERPRETED,
            GROUP=GROUP_M,
        )


def bias_grad(grad: Tensor, idx: Tensor | None, out: Tensor) -> None:
    """Write ``Σ_{n,p} grad[n, idx, p]`` into ``out[idx]``; grad 5-D with contiguous positions."""
    count = active_count(idx, grad.shape[1])
    positions = grad.shape[2] * grad.shape[3] * grad.shape[4]
    if count == 0 or grad.shape[0] * positions == 0:
        return
    with on_device(grad):
        splora_conv_bias_grad_kernel[(triton.cdiv(count, BIAS_GRAD_BLOCK_N),)](
            grad, idx if idx is not None else out, out,
            grad.shape[0] * positions, count, positions,
            grad.stride(0), grad.stride(1),
            HAS_IDX=idx is not None,
            IN_INTERPRETER=INTERPRETED,
            BLOCK_N=BIAS_GRAD_BLOCK_N,
            BLOCK_M=BIAS_GRAD_BLOCK_M,
        )


def _backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    adapter: Tensor | None,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    scale: float,
    need: dict[str, bool],
) -> dict[str, Tensor | None]:
    """Gradients named in ``need`` (x, weight, lora_a, lora_b, adapter, bias); see the module docstring."""
    check_conv_operands(x, weight, {"lora_a": lora_a, "lora_b": lora_b, "adapter": adapter})
    shape = conv_shape(x, weight, stride, padding, dilation)
    out_channels, in_channels = weight.shape[:2]
    expected = (shape.batch, out_channels, *shape.out_size[3 - shape.dims:])
    if tuple(grad_out.shape) != expected or grad_out.dtype != x.dtype or grad_out.device != x.device:
        raise ValueError(
            f"grad_out must be {x.dtype} of shape {expected} on {x.device}, "
            f"got {grad_out.dtype} of shape {tuple(grad_out.shape)} on {grad_out.device}"
        )
    in_idx = index_list(in_idx, "in_idx", in_channels, x.device)
    out_idx = index_list(out_idx, "out_idx", out_channels, x.device)
    all_in = active_count(in_idx, in_channels) == in_channels
    all_out = active_count(out_idx, out_channels) == out_channels
    has_lora = lora_a is not None
    need_x, need_w, need_bias = need["x"], need["weight"], need["bias"]
    need_a, need_b = need.get("lora_a", False) and has_lora, need.get("lora_b", False) and has_lora
    need_p = need.get("adapter", False) and adapter is not None

    grads = {
        "x": new_output(x.shape, x, all_in) if need_x else None,
        "weight": new_output(weight.shape, x, all_in and all_out) if need_w else None,
        "lora_a": new_output(lora_a.shape, x, all_in) if need_a else None,
        "lora_b": new_output(lora_b.shape, x, all_out) if need_b else None,
        "adapter": new_output(adapter.shape, x, all_in and all_out) if need_p else None,
        "bias": new_output((out_channels,), x, all_out) if need_bias else None,
    }
    if shape.batch == 0 or active_count(out_idx, out_channels) == 0:
        # No active output: every gradient is its zero initialisation.
        return {name: g.zero_() if g is not None else None for name, g in grads.items()}

    x5, dy5 = as_5d(x.contiguous()), as_5d(grad_out.contiguous())
    weight5 = as_5d(weight.contiguous())
    centre = shape.centre_tap()
    # u = s · B_Oᵀ dy_O and t = s · A_S x_c,S, each once, in fp32.
    u = conv_rank_product(dy5, lora_b, out_idx, shape.pointwise(), scale) if (need_x and has_lora) or need_a else None
    t = conv_rank_product(x5, lora_a.t(), in_idx, centre, scale) if need_b else None

    if need_x:
        implicit_gemm(
            dy5, weight5, out_idx, in_idx, as_5d(grads["x"]), shape, transposed=True,
            adapter=adapter, low=u, low_weight=lora_a,
        )
    # db rides along with the first kernel that reads all of dy_O, if any (the
    # dW and dP kernels launch nothing when every input channel is pruned).
    bias_pending = need_bias
    any_in = active_count(in_idx, in_channels) > 0
    if need_b:
        weight_grad(dy5, out_idx, t, None, grads["lora_b"][:, :, None, None, None], shape.pointwise(),
                    column_sum=grads["bias"] if bias_pending else None)
        bias_pending = False
    if need_p:
        fuse_bias = bias_pending and any_in
        weight_grad(dy5, out_idx, x5, in_idx, grads["adapter"][:, :, None, None, None], centre,
                    column_sum=grads["bias"] if fuse_bias else None)
        bias_pending = bias_pending and not fuse_bias
    if need_w:
        fuse_bias = bias_pending and any_in
        weight_grad(dy5, out_idx, x5, in_idx, as_5d(grads["weight"]), shape,
                    column_sum=grads["bias"] if fuse_bias else None)
        bias_pending = bias_pending and not fuse_bias
    if bias_pending:
        bias_grad(dy5, out_idx, grads["bias"])
    if need_a:
        weight_grad(u, None, x5, in_idx, grads["lora_a"][:, :, None, None, None], centre)
    return grads


def splora_conv_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    scale: float,
    output_mask: tuple[bool, bool, bool, bool, bool],
) -> tuple[Tensor | None, ...]:
    """Gradients of (x, weight, lora_a, lora_b, bias); ``None`` where ``output_mask`` is False."""
    names = ("x", "weight", "lora_a", "lora_b", "bias")
    need = {name: bool(m) for name, m in zip(names, output_mask, strict=True)}
    grads = _backward(grad_out, x, weight, lora_a, lora_b, None, in_idx, out_idx,
                      stride, padding, dilation, scale, need)
    return tuple(grads[name] for name in names)


def sppara_conv_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    adapter: Tensor,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    output_mask: tuple[bool, bool, bool, bool],
) -> tuple[Tensor | None, ...]:
    """Gradients of (x, weight, adapter, bias); ``None`` where ``output_mask`` is False."""
    if adapter is None:
        raise ValueError("sppara_conv_backward needs an adapter (C_out, C_in)")
    names = ("x", "weight", "adapter", "bias")
    need = {name: bool(m) for name, m in zip(names, output_mask, strict=True)}
    grads = _backward(grad_out, x, weight, None, None, adapter, in_idx, out_idx,
                      stride, padding, dilation, 1.0, need)
    return tuple(grads[name] for name in names)
