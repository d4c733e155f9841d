r"""Masked SPLoRA / SPPaRA convolution in Triton: forward, and the kernel backward reuses for dx.

Math (``S = in_idx``, ``O = out_idx``, ``s = scale``, ``c`` the centre tap, positions
per spatial dimension, zero outside the input)::

    t[n, :, p]  = s · A_S x_S[n, :, p·stride + c·dilation − padding]            (r × positions, fp32)
    y[n, o, p]  = b[o] + Σ_{i∈S} Σ_taps W[o, i, tap] x[n, i, p·stride + tap·dilation − padding]
                       + Σ_j B[o, j] t[n, j, p]                                  (SPLoRA)
                       + Σ_{i∈S} P[o, i] x[n, i, p·stride + c·dilation − padding] (SPPaRA)
    y[n, o, p]  = 0                                                              (o ∉ O)

Shapes: x (N, C_in, *spatial) with 1–3 spatial dims, weight W (C_out, C_in, *kernel)
with odd kernel sizes, lora_a A (r, C_in), lora_b B (C_out, r), adapter P (C_out, C_in),
bias b (C_out,), in_idx / out_idx int64 or None (all active); stride, padding and
dilation are tuples with one int per spatial dim; groups is always 1 (the backend's
capabilities exclude grouped convolutions, and the op layer checks them).

Every launch sees three spatial dims (missing ones are size 1), so one kernel
serves conv1d, conv2d and conv3d.  That kernel is an implicit GEMM:

``splora_conv_implicit_gemm_kernel``
    ``out[n, col, q] = out_scale · Σ_tap Σ_k src[n, k, src_pos(q, tap)] · w[k, col, tap]
    (+ adapter terms at the centre tap) + bias[col]``.  Rows are output positions
    (n, q), columns the *active* output channels, K the active source channels
    times the taps.  Grid: row tiles × active column tiles (× stride phases).
    Each program loads its slice of the column index list once, walks the taps
    one spatial dim at a time (each dim's shift and bounds worked out once per
    value), and per tap runs the K-steps over the active source channels,
    loading one slice of their index list per step.
    The adapter runs as extra K-steps after the taps, over the centre-tap source:
    rank-r steps over the fp32 pre-pass ``t`` with ``B_Oᵀ`` (SPLoRA) or |S| steps
    with ``P_OSᵀ`` (SPPaRA), so ``W + BA`` never exists.  fp32 accumulation,
    bias fused.

It runs in two directions, chosen by the ``TRANSPOSED`` flag:

forward (``TRANSPOSED=False``)
    src = x, w = W viewed (C_in, C_out, taps), rows = output positions,
    ``src_pos = q·stride + tap·dilation − padding``.  The rank-r pre-pass ``t`` is
    the same kernel with a single tap (the centre), w = Aᵀ and out_scale = s.

dx (``TRANSPOSED=True``, ``conv_backward.py``)
    src = dy, w = W (C_out, C_in, taps), rows = input positions.  An input
    position q receives from output p through tap k when
    ``p·stride + k·dilation − padding = q``.  Rows are split into stride phases
    (q mod stride, one grid slice each); within a phase a tap either reaches
    every row or none, and the reaching ones are evenly spaced, so each program
    loops over exactly its phase's taps (``first_reaching_tap``) instead of
    masking the others row by row, and p = (q + padding − k·dilation) / stride
    is exact.  No col2im buffer, no atomics, no wasted MMAs at stride > 1.

Inactive output channels are never touched by a kernel: when some are pruned
the output is allocated with ``torch.zeros`` (one memset).  Offsets multiplied
by a memory stride are int64.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

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
    rank_block,
    round_to,
    tile_configs,
    tile_coordinates,
)


def _implicit_gemm_configs() -> list[triton.Config]:
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).  The K loop runs per tap over
    # the active channels, so K blocks stay at 32–64; the narrow-N configs are
    # for the rank-r pre-pass and small |O|.
    shapes = [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 64, 4, 3),
        (64, 64, 32, 4, 4),
        (128, 32, 64, 4, 3),
        (64, 16, 64, 4, 3),
    ]
    # In the interpreter, one small config.  It allows dots narrower than 16, so
    # 8-wide channel blocks make the tests' tiny channel counts span several
    # blocks with ragged tails; rows (batch × positions) are many, and each
    # program costs interpreter time, hence 32.
    return tile_configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), shapes, interpreted=(32, 8, 8))


# ---------------------------------------------------------------------------- helpers
#
# Index arithmetic on row vectors is int64 throughout: it is what addresses
# need anyway, and Triton's interpreter checks every int32 op for overflow,
# which makes int32 vector math several times slower there.


@triton.jit
def split_rows(rows, ROWS_D, ROWS_H, ROWS_W):
    """Batch index and (d, h, w) row-grid coordinates of flat rows (row-major)."""
    r_w = rows % ROWS_W
    rest = rows // ROWS_W
    r_h = rest % ROWS_H
    rest = rest // ROWS_H
    return rest // ROWS_D, rest % ROWS_D, r_h, r_w


@triton.jit
def in_bounds(ok, c_d, c_h, c_w, SIZE_D, SIZE_H, SIZE_W, SPATIAL_DIMS: tl.constexpr):
    """``ok`` and whether coordinates lie in a SIZE_D × SIZE_H × SIZE_W grid; the unit dims
    that pad conv1d and conv2d up to three are always 0 and are not checked."""
    ok = ok & (c_w >= 0) & (c_w < SIZE_W)
    if SPATIAL_DIMS >= 2:
        ok = ok & (c_h >= 0) & (c_h < SIZE_H)
    if SPATIAL_DIMS >= 3:
        ok = ok & (c_d >= 0) & (c_d < SIZE_D)
    return ok


@triton.jit
def first_reaching_tap(phase, PAD, CONV_STRIDE, TAP_STEP, TAP_INVERSE, KERNEL):
    """The first tap, along one dim, that reaches the input rows ``phase + CONV_STRIDE·r``
    (KERNEL if none does); the next ones follow every TAP_STEP taps.

    Tap k reaches them when k·DIL ≡ phase + PAD (mod CONV_STRIDE).  With
    g = gcd(DIL, CONV_STRIDE) = CONV_STRIDE / TAP_STEP, that needs g | phase + PAD, and then
    k ≡ (phase + PAD)/g · TAP_INVERSE (mod TAP_STEP), TAP_INVERSE being the inverse
    of DIL/g modulo TAP_STEP (both from the host).
    """
    numerator = phase + PAD
    divisor = CONV_STRIDE // TAP_STEP
    first = (numerator // divisor * TAP_INVERSE) % TAP_STEP
    return tl.where(numerator % divisor == 0, first, KERNEL)


# ---------------------------------------------------------------------------- kernel


@triton.autotune(
    configs=_implicit_gemm_configs(),
    key=["M", "N", "K", "R", "TAPS", "TRANSPOSED", "SPATIAL_DIMS"],
    prune_configs_by={"early_config_prune": prune_configs({"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "K"})},
)
@triton.jit
def splora_conv_implicit_gemm_kernel(
    src_ptr, weight_ptr, adapter_ptr, low_ptr, low_weight_ptr, bias_ptr, k_idx_ptr, n_idx_ptr, out_ptr,
    M, N, K, R, TAPS, BATCH, out_scale,
    OUT_D, OUT_H, OUT_W,
    SRC_D, SRC_H, SRC_W,
    KERNEL_D, KERNEL_H, KERNEL_W,
    CONV_STRIDE_D, CONV_STRIDE_H, CONV_STRIDE_W,
    PAD_D, PAD_H, PAD_W,
    DIL_D, DIL_H, DIL_W,
    TAP_STEP_D, TAP_STEP_H, TAP_STEP_W,
    TAP_INVERSE_D, TAP_INVERSE_H, TAP_INVERSE_W,
    stride_src_n, stride_src_k, stride_src_d, stride_src_h, stride_src_w,
    stride_weight_k, stride_weight_n, stride_weight_d, stride_weight_h, stride_weight_w,
    stride_adapter_k, stride_adapter_n,
    stride_low_n, stride_low_r, stride_low_d, stride_low_h, stride_low_w,
    stride_low_weight_r, stride_low_weight_n,
    stride_out_n, stride_out_c, stride_out_d, stride_out_h, stride_out_w,
    SPATIAL_DIMS: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    HAS_K_IDX: tl.constexpr,
    HAS_N_IDX: tl.constexpr,
    HAS_LOW_RANK: tl.constexpr,
    HAS_ADAPTER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    IN_INTERPRETER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP: tl.constexpr,
):
    """out[n, n_idx[c], q] = out_scale · Σ_tap Σ_k src[n, k_idx[k], src_pos(q, tap)] w[k_idx[k], n_idx[c], tap]
                             + Σ_k src[n, k_idx[k], src_pos(q, centre)] adapter[k_idx[k], n_idx[c]]
                             + Σ_j low[n, j, q or src_pos(q, centre)] low_weight[j, n_idx[c]] + bias[n_idx[c]]

    M is the row count of the largest phase (phase 0), N = |n_idx|, K = |k_idx|,
    TAPS = KERNEL_D·KERNEL_H·KERNEL_W (an autotune key); OUT_* is the full output grid, SRC_* the
    source grid.  Forward ``low`` is indexed by the output position, transposed
    by the centre-tap source position.  ``low`` is fp32.  TAP_STEP_* and
    TAP_INVERSE_* (transposed only) are described in ``first_reaching_tap``.
    """
    pid_m, pid_n = tile_coordinates(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP)

    # This program's stride phase, the shape of its row grid, and the taps that
    # reach it: first_*, first_* + step_*, ... along each dim.
    if TRANSPOSED:
        phase = tl.program_id(1)
        phase_w = phase % CONV_STRIDE_W
        phase_h = (phase // CONV_STRIDE_W) % CONV_STRIDE_H
        phase_d = phase // (CONV_STRIDE_W * CONV_STRIDE_H)
        rows_d = tl.cdiv(OUT_D - phase_d, CONV_STRIDE_D)
        rows_h = tl.cdiv(OUT_H - phase_h, CONV_STRIDE_H)
        rows_w = tl.cdiv(OUT_W - phase_w, CONV_STRIDE_W)
        out_step_d, out_step_h, out_step_w = CONV_STRIDE_D, CONV_STRIDE_H, CONV_STRIDE_W
        first_d = first_reaching_tap(phase_d, PAD_D, CONV_STRIDE_D, TAP_STEP_D, TAP_INVERSE_D, KERNEL_D)
        first_h = first_reaching_tap(phase_h, PAD_H, CONV_STRIDE_H, TAP_STEP_H, TAP_INVERSE_H, KERNEL_H)
        first_w = first_reaching_tap(phase_w, PAD_W, CONV_STRIDE_W, TAP_STEP_W, TAP_INVERSE_W, KERNEL_W)
        step_d, step_h, step_w = TAP_STEP_D, TAP_STEP_H, TAP_STEP_W
    else:
        phase_d, phase_h, phase_w = 0, 0, 0
        rows_d, rows_h, rows_w = OUT_D, OUT_H, OUT_W
        out_step_d, out_step_h, out_step_w = 1, 1, 1
        first_d, first_h, first_w = 0, 0, 0
        step_d, step_h, step_w = 1, 1, 1

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < BATCH * rows_d * rows_h * rows_w
    # max(.., 1): a phase with no rows (input smaller than the stride) divides safely.
    n, r_d, r_h, r_w = split_rows(rows, tl.maximum(rows_d, 1), tl.maximum(rows_h, 1), tl.maximum(rows_w, 1))
    # Row r reads the source at base + shift(tap) along each dim: forward
    # base = r·stride − pad and shift = k·dil; transposed (q = phase + stride·r takes
    # dy at p = (q + pad − k·dil) / stride) base = r and shift = (phase + pad − k·dil) / stride,
    # an exact division for the taps that reach the phase.
    if TRANSPOSED:
        base_d, base_h, base_w = r_d, r_h, r_w
    else:
        base_d = r_d * CONV_STRIDE_D - PAD_D
        base_h = r_h * CONV_STRIDE_H - PAD_H
        base_w = r_w * CONV_STRIDE_W - PAD_W
    src_rows = src_ptr + (
        n * stride_src_n + base_d * stride_src_d + base_h * stride_src_h + base_w * stride_src_w
    )
    # This tile's columns (active output channels): loaded once.
    columns, column_ok = active_columns(n_idx_ptr, pid_n * BLOCK_N, N, BLOCK_N, HAS_N_IDX)
    weight_columns = weight_ptr + columns[None, :] * stride_weight_n

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Taps one dim at a time, so each dim's shift and bounds are worked out once.
    for k_d in range(first_d, KERNEL_D, step_d):
        if TRANSPOSED:
            shift_d = (phase_d + PAD_D - k_d * DIL_D) // CONV_STRIDE_D
        else:
            shift_d = k_d * DIL_D
        ok_d = row_ok
        if SPATIAL_DIMS >= 3:
            ok_d = ok_d & (base_d + shift_d >= 0) & (base_d + shift_d < SRC_D)
        for k_h in range(first_h, KERNEL_H, step_h):
            if TRANSPOSED:
                shift_h = (phase_h + PAD_H - k_h * DIL_H) // CONV_STRIDE_H
            else:
                shift_h = k_h * DIL_H
            ok_h = ok_d
            if SPATIAL_DIMS >= 2:
                ok_h = ok_h & (base_h + shift_h >= 0) & (base_h + shift_h < SRC_H)
            for k_w in range(first_w, KERNEL_W, step_w):
                if TRANSPOSED:
                    shift_w = (phase_w + PAD_W - k_w * DIL_W) // CONV_STRIDE_W
                else:
                    shift_w = k_w * DIL_W
                # This tap's source rows: computed once, used by every K-step.
                src_ok = (ok_h & (base_w + shift_w >= 0) & (base_w + shift_w < SRC_W))[:, None]
                tap_rows = src_rows[:, None] + (
                    shift_d * stride_src_d + shift_h * stride_src_h + shift_w * stride_src_w
                )
                tap_weight = weight_columns + (k_d * stride_weight_d + k_h * stride_weight_h + k_w * stride_weight_w)
                for start in range(0, K, BLOCK_K):
                    channels, channel_ok = active_columns(k_idx_ptr, start, K, BLOCK_K, HAS_K_IDX)
                    lhs = tl.load(
                        tap_rows + channels[None, :] * stride_src_k, mask=src_ok & channel_ok[None, :], other=0.0
                    )
                    rhs = tl.load(
                        tap_weight + channels[:, None] * stride_weight_k,
                        mask=channel_ok[:, None] & column_ok[None, :], other=0.0,
                    )
                    acc = mma(lhs, rhs, acc, INPUT_PRECISION, IN_INTERPRETER)
    acc = acc * out_scale

    if HAS_LOW_RANK or HAS_ADAPTER:
        # The adapter lives on the centre tap (odd kernels), which reaches every
        # forward row but not every transposed phase.
        if TRANSPOSED:
            numerator_d = phase_d + PAD_D - (KERNEL_D // 2) * DIL_D
            numerator_h = phase_h + PAD_H - (KERNEL_H // 2) * DIL_H
            numerator_w = phase_w + PAD_W - (KERNEL_W // 2) * DIL_W
            # x % m == 0 means the same under floor and truncating division.
            centre_reaches = (
                (numerator_d % CONV_STRIDE_D == 0) & (numerator_h % CONV_STRIDE_H == 0)
                & (numerator_w % CONV_STRIDE_W == 0)
            )
            centre_d = base_d + numerator_d // CONV_STRIDE_D
            centre_h = base_h + numerator_h // CONV_STRIDE_H
            centre_w = base_w + numerator_w // CONV_STRIDE_W
        else:
            centre_reaches = True
            centre_d = base_d + (KERNEL_D // 2) * DIL_D
            centre_h = base_h + (KERNEL_H // 2) * DIL_H
            centre_w = base_w + (KERNEL_W // 2) * DIL_W
        if centre_reaches:
            centre_ok = in_bounds(row_ok, centre_d, centre_h, centre_w, SRC_D, SRC_H, SRC_W, SPATIAL_DIMS)
            if HAS_ADAPTER:
                # SPPaRA: K more K-steps over the centre-tap source with the adapter as weight.
                centre_rows = src_ptr + (
                    n * stride_src_n + centre_d * stride_src_d + centre_h * stride_src_h + centre_w * stride_src_w
                )[:, None]
                adapter_columns = adapter_ptr + columns[None, :] * stride_adapter_n
                for start in range(0, K, BLOCK_K):
                    channels, channel_ok = active_columns(k_idx_ptr, start, K, BLOCK_K, HAS_K_IDX)
                    lhs = tl.load(
                        centre_rows + channels[None, :] * stride_src_k,
                        mask=centre_ok[:, None] & channel_ok[None, :], other=0.0,
                    )
                    rhs = tl.load(
                        adapter_columns + channels[:, None] * stride_adapter_k,
                        mask=channel_ok[:, None] & column_ok[None, :], other=0.0,
                    )
                    acc = mma(lhs, rhs, acc, INPUT_PRECISION, IN_INTERPRETER)
            if HAS_LOW_RANK:
                # SPLoRA: R more K-steps over the fp32 rank-r product, rounded to the
                # input dtype like the rank-r intermediate of a PyTorch LoRA.  The
                # forward pre-pass lives on the output grid, the backward one on dy's.
                if TRANSPOSED:
                    low_d, low_h, low_w, low_ok = centre_d, centre_h, centre_w, centre_ok
                else:
                    low_d, low_h, low_w, low_ok = r_d, r_h, r_w, row_ok
                low_rows = low_ptr + (
                    n * stride_low_n + low_d * stride_low_d + low_h * stride_low_h + low_w * stride_low_w
                )[:, None]
                low_weight_columns = low_weight_ptr + columns[None, :] * stride_low_weight_n
                for start in range(0, R, BLOCK_R):
                    ranks = start + tl.arange(0, BLOCK_R)
                    rank_ok = ranks < R
                    ranks = ranks.to(tl.int64)
                    low_weight = tl.load(
                        low_weight_columns + ranks[:, None] * stride_low_weight_r,
                        mask=rank_ok[:, None] & column_ok[None, :], other=0.0,
                    )
                    low = tl.load(
                        low_rows + ranks[None, :] * stride_low_r, mask=low_ok[:, None] & rank_ok[None, :], other=0.0
                    )
                    acc = mma(
                        round_to(low, low_weight.dtype, IN_INTERPRETER), low_weight, acc, INPUT_PRECISION,
                        IN_INTERPRETER,
                    )

    if HAS_BIAS:
        bias = tl.load(bias_ptr + columns, mask=column_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]

    out_rows = (
        n * stride_out_n
        + (r_d * out_step_d + phase_d) * stride_out_d
        + (r_h * out_step_h + phase_h) * stride_out_h
        + (r_w * out_step_w + phase_w) * stride_out_w
    )
    tl.store(
        out_ptr + out_rows[:, None] + columns[None, :] * stride_out_c,
        round_to(acc, out_ptr.dtype.element_ty, IN_INTERPRETER),
        mask=row_ok[:, None] & column_ok[None, :],
    )


# ---------------------------------------------------------------------------- launchers


def transposed_tap_steps(shape: ConvShape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per dim, the period of the taps that reach one stride phase, and the inverse of
    dil/g modulo that period (g = gcd(dil, stride)); see ``first_reaching_tap``."""
    steps, inverses = [], []
    for stride, dilation in zip(shape.stride, shape.dilation, strict=True):
        step = stride // math.gcd(stride, dilation)
        steps.append(step)
        inverses.append(pow(dilation // (stride // step), -1, step) if step > 1 else 0)
    return tuple(steps), tuple(inverses)


def implicit_gemm(
    src: Tensor,
    weight: Tensor,
    k_idx: Tensor | None,
    n_idx: Tensor | None,
    out: Tensor,
    shape: ConvShape,
    transposed: bool = False,
    out_scale: float = 1.0,
    adapter: Tensor | None = None,
    low: Tensor | None = None,
    low_weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> None:
    """Write the convolution of ``src`` into the ``n_idx`` channels of ``out``; see the kernel.

    All 5-D: src (N, K_full, *grid), weight (K_full, N_full, *kernel) — a view, any
    strides — out (N, N_full, *grid).  Forward: src grid = ``shape.in_size``, out grid
    = ``shape.out_size``; transposed the other way round.  adapter (K_full, N_full),
    low (N, R, *grid) fp32 on the out grid (forward) or the src grid (transposed),
    low_weight (R, N_full), bias (N_full,).
    """
    k_count = active_count(k_idx, src.shape[1])
    n_count = active_count(n_idx, out.shape[1])
    src_size, out_size = (shape.out_size, shape.in_size) if transposed else (shape.in_size, shape.out_size)
    phases = shape.stride if transposed else (1, 1, 1)
    rows = shape.batch
    for size, phase_count in zip(out_size, phases, strict=True):
        rows *= triton.cdiv(size, phase_count)  # phase 0 has the most rows
    if rows == 0 or n_count == 0:
        return
    rank = low.shape[1] if low is not None else 0
    tap_steps, tap_inverses = transposed_tap_steps(shape) if transposed else ((1, 1, 1), (0, 0, 0))
    placeholder = out  # unused pointers still need a tensor; their flags keep them unread

    def grid(meta):
        return (
            triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(n_count, meta["BLOCK_N"]),
            phases[0] * phases[1] * phases[2],
        )

    with on_device(src):
        splora_conv_implicit_gemm_kernel[grid](
            src, weight,
            adapter if adapter is not None else placeholder,
            low if low is not None else placeholder,
            low_weight if low_weight is not None else placeholder,
            bias if bias is not None else placeholder,
            k_idx if k_idx is not None else placeholder,
            n_idx if n_idx is not None else placeholder,
            out,
            rows, n_count, k_count, rank, shape.taps, shape.batch, float(out_scale),
            *out_size, *src_size, *shape.kernel, *shape.stride, *shape.padding, *shape.dilation,
            *tap_steps, *tap_inverses,
            *src.stride(),
            *weight.stride(),
            *(adapter.stride() if adapter is not None else (0, 0)),
            *(low.stride() if low is not None else (0,) * 5),
            *(low_weight.stride() if low_weight is not None else (0, 0)),
            *out.stride(),
            SPATIAL_DIMS=shape.dims,
            TRANSPOSED=transposed,
            HAS_K_IDX=k_idx is not None,
            HAS_N_IDX=n_idx is not None,
            HAS_LOW_RANK=low is not None,
            HAS_ADAPTER=adapter is not None,
            HAS_BIAS=bias is not None,
            INPUT_PRECISION=dot_precision(src.dtype),
            IN_INTERPRETER=INTERPRETED,
            BLOCK_R=rank_block(max(rank, 1)),
            GROUP=GROUP_M,
        )


def conv_rank_product(src: Tensor, rank_weight: Tensor, idx: Tensor | None, shape: ConvShape, scale: float) -> Tensor:
    """``scale · Σ_{k∈idx} src[n, k, pos(q)] · rank_weight[k, j]`` as (N, R, *out grid) fp32.

    src is 5-D, rank_weight (K_full, R); ``shape`` is the 1-tap convolution
    that maps src positions to output positions (``ConvShape.centre_tap`` or
    ``ConvShape.pointwise``).
    """
    rank = rank_weight.shape[1]
    out = torch.empty((shape.batch, rank, *shape.out_size), dtype=torch.float32, device=src.device)
    implicit_gemm(src, rank_weight[:, :, None, None, None], idx, None, out, shape, out_scale=scale)
    return out


def _forward(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    adapter: Tensor | None,
    bias: Tensor | None,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    scale: float,
) -> Tensor:
    check_conv_operands(x, weight, {"lora_a": lora_a, "lora_b": lora_b, "adapter": adapter, "bias": bias})
    shape = conv_shape(x, weight, stride, padding, dilation)
    out_channels, in_channels = weight.shape[:2]
    in_idx = index_list(in_idx, "in_idx", in_channels, x.device)
    out_idx = index_list(out_idx, "out_idx", out_channels, x.device)
    n_active = active_count(out_idx, out_channels)
    y = new_output((shape.batch, out_channels, *shape.out_size), x, all_written=n_active == out_channels)
    if n_active > 0 and shape.batch > 0:
        x5 = as_5d(x.contiguous())
        bias = bias.contiguous() if bias is not None else None
        low = None
        if lora_a is not None:
            low = conv_rank_product(x5, lora_a.t(), in_idx, shape.centre_tap(), scale)
        implicit_gemm(
            x5, as_5d(weight.contiguous()).transpose(0, 1), in_idx, out_idx, y, shape,
            adapter=adapter.t() if adapter is not None else None,
            low=low, low_weight=lora_b.t() if lora_b is not None else None, bias=bias,
        )
    return y.reshape(shape.batch, out_channels, *shape.out_size[3 - shape.dims:])


def splora_conv_forward(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    bias: Tensor | None,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    scale: float,
) -> Tensor:
    """y (N, C_out, *out spatial) = masked SPLoRA convolution of x; see the module docstring."""
    return _forward(x, weight, lora_a, lora_b, None, bias, in_idx, out_idx, stride, padding, dilation, scale)


def sppara_conv_forward(
    x: Tensor,
    weight: Tensor,
    adapter: Tensor,
    bias: Tensor | None,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
) -> Tensor:
    """y (N, C_out, *out spatial) = masked SPPaRA convolution of x; see the module docstring."""
    if adapter is None:
        raise ValueError("sppara_conv_forward needs an adapter (C_out, C_in)")
    return _forward(x, weight, None, None, adapter, bias, in_idx, out_idx, stride, padding, dilation, 1.0)
