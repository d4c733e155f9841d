r"""Masked SPLoRA linear in Triton: the backward pass.

Math (``dy`` = grad of y, M × out; ``u = s · dy_O B_O`` and ``t = s · x_S A_Sᵀ``,
both M × r in fp32 from ``splora_rank_product_kernel``)::

    dx[:, S]  = dy_O W_OS + u A_S          gathered matmul (the forward kernel)
    dA[:, S]  = uᵀ x_S                     = s (dy_O B_O)ᵀ x_S
    dB[O, :]  = dy_Oᵀ t                    = s dy_Oᵀ (x_S A_Sᵀ)
    db[O]     = Σ_m dy[m, O]
    dW[O, S]  = dy_Oᵀ x_S                  only when asked (masked fine-tuning)

and zero at every pruned entry.  The three weight-shaped gradients are one
kernel, ``splora_gathered_tn_kernel``, which reduces over the M rows::

    out[l_idx[i], r_idx[j]] = Σ_m left[m, l_idx[i]] · right[m, r_idx[j]]

with dW: left = dy, right = x;  dB: left = dy, right = t;  dA: left = x,
right = u, written through the transposed view of dA.  Its programs tile the
active (i, j) block only.  When it reads dy (dB or dW), the programs of the
first j-tile also sum their dy tiles into db; otherwise
``splora_bias_grad_kernel`` does that alone.

Pruned entries are zeros from ``torch.zeros`` (one memset per gradient that has
any); gradients whose every entry is active are allocated uninitialised.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .linear import (
    GROUP_M,
    INTERPRETED,
    MIN_BLOCK,
    active_columns,
    active_count,
    check_linear_operands,
    dot_precision,
    gathered_matmul,
    index_list,
    mma,
    new_output,
    on_device,
    prune_configs,
    rank_product,
    round_to,
    tile_configs,
    tile_coordinates,
)


def _tn_configs() -> list[triton.Config]:
    # (BLOCK_LEFT, BLOCK_RIGHT, BLOCK_M, warps, stages): square tiles for dW,
    # narrow right blocks for dA and dB, whose right operand is rank-r wide.
    shapes = [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 3),
        (64, 128, 64, 4, 3),
        (64, 64, 64, 4, 4),
        (128, 32, 64, 4, 4),
        (64, 32, 64, 4, 4),
        (64, 16, 128, 4, 3),
        (32, 16, 128, 2, 4),
    ]
    return tile_configs(("BLOCK_LEFT", "BLOCK_RIGHT", "BLOCK_M"), shapes, interpreted=(16, 16, 16))


# Column sums read dy once and do no math worth tiling for.
BIAS_GRAD_BLOCK_N = MIN_BLOCK if INTERPRETED else 128
BIAS_GRAD_BLOCK_M = MIN_BLOCK if INTERPRETED else 64


# ---------------------------------------------------------------------------- kernels


@triton.autotune(
    configs=_tn_configs(),
    key=["M", "N_LEFT", "N_RIGHT"],
    prune_configs_by={"early_config_prune": prune_configs({"BLOCK_LEFT": "N_LEFT", "BLOCK_RIGHT": "N_RIGHT"})},
)
@triton.jit
def splora_gathered_tn_kernel(
    left_ptr, right_ptr, left_idx_ptr, right_idx_ptr, out_ptr, column_sum_ptr,
    M, N_LEFT, N_RIGHT,
    stride_left_m, stride_left_i,
    stride_right_m, stride_right_j,
    stride_out_i, stride_out_j,
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
    """out[l_idx[i], r_idx[j]] = Σ_m left[m, l_idx[i]] right[m, r_idx[j]].

    N_LEFT = |l_idx| and N_RIGHT = |r_idx| count active channels only.  With COLUMN_SUM, column_sum[l_idx[i]] = Σ_m left[m, l_idx[i]] as well.
    ``right`` may be fp32 while ``left`` is 16-bit: it is rounded to left's dtype.
    """
    pid_left, pid_right = tile_coordinates(tl.program_id(0), N_LEFT, N_RIGHT, BLOCK_LEFT, BLOCK_RIGHT, GROUP)
    left_channels, left_ok = active_columns(left_idx_ptr, pid_left * BLOCK_LEFT, N_LEFT, BLOCK_LEFT, HAS_LEFT_IDX)
    right_channels, right_ok = active_columns(right_idx_ptr, pid_right * BLOCK_RIGHT, N_RIGHT, BLOCK_RIGHT, HAS_RIGHT_IDX)

    acc = tl.zeros((BLOCK_LEFT, BLOCK_RIGHT), dtype=tl.float32)
    column_sum = tl.zeros((BLOCK_LEFT,), dtype=tl.float32)
    for start in range(0, M, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows = rows.to(tl.int64)
        # Loaded already transposed (channels × rows): the dot wants leftᵀ.
        left = tl.load(
            left_ptr + left_channels[:, None] * stride_left_i + rows[None, :] * stride_left_m,
            mask=left_ok[:, None] & row_ok[None, :], other=0.0,
        )
        right = tl.load(
            right_ptr + rows[:, None] * stride_right_m + right_channels[None, :] * stride_right_j,
            mask=row_ok[:, None] & right_ok[None, :], other=0.0,
        )
        acc = mma(left, round_to(right, left.dtype, IN_INTERPRETER), acc, INPUT_PRECISION, IN_INTERPRETER)
        if COLUMN_SUM:
            column_sum += tl.sum(left.to(tl.float32), axis=1)

    tl.store(
        out_ptr + left_channels[:, None] * stride_out_i + right_channels[None, :] * stride_out_j,
        round_to(acc, out_ptr.dtype.element_ty, IN_INTERPRETER),
        mask=left_ok[:, None] & right_ok[None, :],
    )
    # One program per left tile writes the column sums: a branch on a scalar
    # rather than a scalar folded into the block mask, whose dtype Triton's
    # interpreter (3.9) does not keep boolean.
    if COLUMN_SUM:
        if pid_right == 0:
            tl.store(
                column_sum_ptr + left_channels,
                round_to(column_sum, column_sum_ptr.dtype.element_ty, IN_INTERPRETER),
                mask=left_ok,
            )


@triton.jit
def splora_bias_grad_kernel(
    grad_ptr, idx_ptr, out_ptr,
    M, N,
    stride_grad_m, stride_grad_n,
    HAS_IDX: tl.constexpr,
    IN_INTERPRETER: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """out[idx[n]] = Σ_m grad[m, idx[n]]   (N = |idx|)."""
    channels, channel_ok = active_columns(idx_ptr, tl.program_id(0) * BLOCK_N, N, BLOCK_N, HAS_IDX)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, M, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows = rows.to(tl.int64)
        grad = tl.load(
            grad_ptr + rows[:, None] * stride_grad_m + channels[None, :] * stride_grad_n,
            mask=row_ok[:, None] & channel_ok[None, :], other=0.0,
        )
        total += tl.sum(grad.to(tl.float32), axis=0)
    tl.store(out_ptr + channels, round_to(total, out_ptr.dtype.element_ty, IN_INTERPRETER), mask=channel_ok)


# ---------------------------------------------------------------------------- launchers


def gathered_tn(
    left: Tensor,
    left_idx: Tensor | None,
    right: Tensor,
    right_idx: Tensor | None,
    out: Tensor,
    column_sum: Tensor | None = None,
) -> None:
    """Write ``left[:, l]ᵀ @ right[:, r]`` into ``out[l][:, r]`` (and ``Σ_m left[:, l]`` into
    ``column_sum[l]``).  left (M, I_full), right (M, J_full), out (I_full, J_full); any strides.
    """
    rows = left.shape[0]
    i_count = active_count(left_idx, left.shape[1])
    j_count = active_count(right_idx, right.shape[1])
    if i_count == 0 or j_count == 0:
        return
    placeholder = out

    def grid(meta):
        return (triton.cdiv(i_count, meta["BLOCK_LEFT"]) * triton.cdiv(j_count, meta["BLOCK_RIGHT"]),)

    with on_device(left):
        splora_gathered_tn_kernel[grid](
            left, right,
            left_idx if left_idx is not None else placeholder,
            right_idx if right_idx is not None else placeholder,
            out,
            column_sum if column_sum is not None else placeholder,
            rows, i_count, j_count,
            left.stride(0), left.stride(1),
            right.stride(0), right.stride(1),
            out.stride(0), out.stride(1),
            HAS_LEFT_IDX=left_idx is not None,
            HAS_RIGHT_IDX=right_idx is not None,
            COLUMN_SUM=column_sum is not None,
            INPUT_PRECISION=dot_precision(left.dtype),
            IN_INTERPRETER=INTERPRETED,
            GROUP=GROUP_M,
        )


def bias_grad(grad: Tensor, idx: Tensor | None, out: Tensor) -> None:
    """Write ``Σ_m grad[:, idx]`` into ``out[idx]``."""
    count = active_count(idx, grad.shape[1])
    if count == 0:
        return
    with on_device(grad):
        splora_bias_grad_kernel[(triton.cdiv(count, BIAS_GRAD_BLOCK_N),)](
            grad, idx if idx is not None else out, out,
            grad.shape[0], count,
            grad.stride(0), grad.stride(1),
            HAS_IDX=idx is not None,
            IN_INTERPRETER=INTERPRETED,
            BLOCK_N=BIAS_GRAD_BLOCK_N,
            BLOCK_M=BIAS_GRAD_BLOCK_M,
        )


def splora_linear_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    scale: float,
    output_mask: tuple[bool, bool, bool, bool, bool],
) -> tuple[Tensor | None, ...]:
    """Gradients of (x, weight, lora_a, lora_b, bias); ``None`` where ``output_mask`` is False."""
    check_linear_operands(x, weight, lora_a, lora_b, None)
    out_features, in_features = weight.shape
    if tuple(grad_out.shape) != (x.shape[0], out_features) or grad_out.dtype != x.dtype:
        raise ValueError(
            f"grad_out must be {x.dtype} of shape {(x.shape[0], out_features)}, "
            f"got {grad_out.dtype} of shape {tuple(grad_out.shape)}"
        )
    need_x, need_w, need_a, need_b, need_bias = (bool(m) for m in output_mask)
    has_adapter = lora_a is not None
    need_a, need_b = need_a and has_adapter, need_b and has_adapter
    in_idx = index_list(in_idx, "in_idx", in_features, x.device)
    out_idx = index_list(out_idx, "out_idx", out_features, x.device)
    all_in = active_count(in_idx, in_features) == in_features
    all_out = active_count(out_idx, out_features) == out_features

    grad_x = new_output(x.shape, x, all_in) if need_x else None
    grad_w = new_output(weight.shape, x, all_in and all_out) if need_w else None
    grad_a = new_output(lora_a.shape, x, all_in) if need_a else None
    grad_b = new_output(lora_b.shape, x, all_out) if need_b else None
    grad_bias = new_output((out_features,), x, all_out) if need_bias else None
    if x.shape[0] == 0 or active_count(out_idx, out_features) == 0:
        # No active output: every gradient is its zero initialisation.
        return tuple(
            g.zero_() if g is not None else None for g in (grad_x, grad_w, grad_a, grad_b, grad_bias)
        )

    # u = s · dy_O B_O and t = s · x_S A_Sᵀ, each once, in fp32.
    u = rank_product(grad_out, lora_b, out_idx, scale) if (need_x and has_adapter) or need_a else None
    t = rank_product(x, lora_a.t(), in_idx, scale) if need_b else None

    if need_x:
        gathered_matmul(
            grad_out, weight, out_idx, in_idx, grad_x,
            low=u, low_rhs=lora_a if has_adapter else None,
        )
    # db rides along with the first kernel that reads all of dy_O, if any (the
    # dW kernel launches nothing when every input channel is pruned).
    bias_pending = need_bias
    if need_b:
        gathered_tn(grad_out, out_idx, t, None, grad_b, column_sum=grad_bias if bias_pending else None)
        bias_pending = False
    if need_w:
        fuse_bias = bias_pending and active_count(in_idx, in_features) > 0
        gathered_tn(grad_out, out_idx, x, in_idx, grad_w, column_sum=grad_bias if fuse_bias else None)
        bias_pending = bias_pending and not fuse_bias
    if bias_pending:
        bias_grad(grad_out, out_idx, grad_bias)
    if need_a:
        gathered_tn(x, in_idx, u, None, grad_a.t())
    return grad_x, grad_w, grad_a, grad_b, grad_bias
