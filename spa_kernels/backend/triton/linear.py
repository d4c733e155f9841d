r"""Masked SPLoRA linear in Triton: the forward pass and the kernels it shares with backward.

Math (``S = in_idx``, ``O = out_idx``, ``s = scale``)::

    t          = s · x_S A_Sᵀ                                  (M × r, fp32)
    y[:, O]    = x_S W_OSᵀ + t B_Oᵀ + b_O                      (M × |O|)
    y[:, o]    = 0                                             (o ∉ O)

Shapes: x (M, in), weight W (out, in), lora_a A (r, in), lora_b B (out, r),
bias b (out,), in_idx (|S|,) and out_idx (|O|,) int64 or None (all active).

Two kernels do the work, and both are written for index-gathered operands so
that the backward pass (``linear_backward.py``) reuses them:

``splora_rank_product_kernel``
    ``scale · lhs[:, idx] @ rhs[idx, :]`` in fp32, the skinny rank-r pre-pass
    (``t`` above, and ``s · dy_O B_O`` in backward).  Grid: row tiles × rank tiles.

``splora_gathered_matmul_kernel``
    ``out[:, n_idx] = lhs[:, k_idx] @ rhs[k_idx][:, n_idx] + low @ low_rhs[:, n_idx] + bias[n_idx]``.
    Grid: row tiles × *active* column tiles only.  Each program loads its slice
    of ``n_idx`` once, one slice of ``k_idx`` per K-step, accumulates in fp32,
    then runs the rank-r term as a few more K-steps over ``low`` (the
    pre-pass output) and adds the bias, so ``W + BA`` never exists.
    Forward: lhs = x, rhs = Wᵀ, low_rhs = Bᵀ.  Backward dx: lhs = dy, rhs = W,
    low = s · dy_O B_O, low_rhs = A.  Transposes are stride swaps, not copies.

Inactive output columns are never touched by a kernel: when some outputs are
pruned the output is allocated with ``torch.zeros`` (one memset), otherwise
with ``torch.empty``.  All offsets that are multiplied by a stride are int64, so
tensors beyond 2³¹ elements address correctly.

Performance note: a gather along an operand's contiguous axis (``k_idx`` here,
i.e. pruned input channels) loads one element per address, which rules out
``cp.async``; Triton then does not software-pipeline that K loop.  Without
``k_idx`` (and for the ``n_idx`` gather, whose rows stay contiguous) the loop
is pipelined as in a dense GEMM.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor


def _interpreting() -> bool:
    """Whether ``triton.jit`` builds interpreted kernels (decided when they are decorated)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Kernels below are decorated at import, so this is the mode they run in for
# the life of the process; ``is_available`` refuses CPU tensors without it.
INTERPRETED = _interpreting()


# Programs that share a weight tile are launched close together (GROUP_M row
# tiles per column tile), so the tile is still in L2 when the next one needs it.
GROUP_M = 8

# tl.dot needs every block dimension >= 16 on NVIDIA tensor cores.
MIN_BLOCK = 16

# The rank-r term is swept in blocks of at most this many rank columns: ranks
# are small (4–64 typically), and a wider block only pads with zeros.
MAX_RANK_BLOCK = 64


def autotune_config(blocks: dict[str, int], warps: int, stages: int) -> triton.Config:
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


def tile_configs(names: tuple[str, ...], shapes: list[tuple[int, ...]],
                 interpreted: tuple[int, ...]) -> list[triton.Config]:
    """Autotune configs of the blocks ``names``, one per row ``(*block sizes, warps, stages)`` of ``shapes``.

    In the interpreter, the single config of ``interpreted`` block sizes (one warp,
    one stage): there is nothing to tune on a CPU, and small tiles make the tests'
    small shapes span several tiles with ragged tails.
    """
    if INTERPRETED:
        return [autotune_config(dict(zip(names, interpreted, strict=True)), 1, 1)]
    return [autotune_config(dict(zip(names, row[:-2], strict=True)), *row[-2:]) for row in shapes]


def _matmul_configs() -> list[triton.Config]:
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).  The first two need ~150 KB of
    # shared memory in bf16 (Hopper, A100); older GPUs reject them while tuning
    # (OutOfResources is skipped by the autotuner) and use the smaller ones.
    shapes = [
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 64, 4, 3),
        (32, 64, 64, 2, 4),  # decode-sized batches
    ]
    return tile_configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), shapes, interpreted=(16, 16, 16))


def _rank_product_configs() -> list[triton.Config]:
    # The pre-pass streams lhs once and is memory bound: small row tiles give
    # enough programs to keep every SM loading.
    shapes = [(32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (16, 128, 2, 4)]
    return tile_configs(("BLOCK_M", "BLOCK_K"), shapes, interpreted=(16, 16))


def prune_configs(sizes: dict[str, str]):
    """An ``early_config_prune`` dropping configs whose blocks dwarf the problem.

    ``sizes`` maps a block name to the kernel argument it tiles.  A block wider
    than the next power of two of its size (and than 16) only computes padding.
    """

    def prune(configs, named_args, **kwargs):
        def fits(config: triton.Config) -> bool:
            return all(
                config.kwargs[block] <= max(MIN_BLOCK, triton.next_power_of_2(int(named_args[size])))
                for block, size in sizes.items()
            )

        kept = [config for config in configs if fits(config)]
        if kept:
            return kept
        return [min(configs, key=lambda c: [c.kwargs[block] for block in sizes])]

    return prune


def rank_block(rank: int) -> int:
    """Rank columns per block of the rank-r term (a compile-time constant of the kernels)."""
    if INTERPRETED:
        return MIN_BLOCK
    return min(max(MIN_BLOCK, triton.next_power_of_2(rank)), MAX_RANK_BLOCK)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for ``dtype``, following PyTorch's fp32 matmul setting.

    The default ``"highest"`` keeps fp32 products exact (the 1e-4 contract);
    ``torch.set_float32_matmul_precision("high")`` allows TF32 as it does for
    ``torch.matmul``.  Half-precision operands ignore it.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


# ---------------------------------------------------------------------------- helpers


@triton.jit
def tile_coordinates(pid, rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, GROUP: tl.constexpr):
    """Row and column tile of program ``pid``, walking GROUP row tiles per column tile."""
    row_tiles = tl.cdiv(rows, BLOCK_ROWS)
    col_tiles = tl.cdiv(cols, BLOCK_COLS)
    programs_per_group = GROUP * col_tiles
    first_row_tile = (pid // programs_per_group) * GROUP
    group_rows = tl.minimum(row_tiles - first_row_tile, GROUP)
    within = pid % programs_per_group
    return first_row_tile + within % group_rows, within // group_rows


@triton.jit
def active_columns(idx_ptr, start, count, BLOCK: tl.constexpr, HAS_IDX: tl.constexpr):
    """Channel numbers of active channels ``start .. start+BLOCK`` (int64) and their validity."""
    local = start + tl.arange(0, BLOCK)
    valid = local < count
    if HAS_IDX:
        channels = tl.load(idx_ptr + local, mask=valid, other=0).to(tl.int64)
    else:
        channels = local.to(tl.int64)
    return channels, valid


# Triton's interpreter mishandles bf16 in two ways: ``tl.dot`` multiplies the raw
# bit patterns as integers, and fp32 -> bf16 casts truncate instead of rounding to
# nearest even.  Kernels take an ``IN_INTERPRETER`` flag and compensate in the two
# helpers below, so that on the CPU they compute what they compute on a GPU.


@triton.jit
def mma(a, b, acc, INPUT_PRECISION: tl.constexpr, IN_INTERPRETER: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation.

    In the interpreter the operands are widened to fp32 first: products of
    16-bit floats are exact in fp32, so this is what the tensor cores compute.
    """
    if IN_INTERPRETER:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def round_to(x, dtype: tl.constexpr, IN_INTERPRETER: tl.constexpr):
    """``x`` rounded to nearest even in ``dtype``.

    In the interpreter a bf16 target is rounded on the bits first (add half an
    ulp, ties to even, clear the low half), which leaves its truncation exact.
    """
    if IN_INTERPRETER:
        if dtype == tl.bfloat16 and x.dtype == tl.float32:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


# ---------------------------------------------------------------------------- kernels


@triton.autotune(
    configs=_rank_product_configs(),
    key=["M", "K", "R"],
    prune_configs_by={"early_config_prune": prune_configs({"BLOCK_M": "M", "BLOCK_K": "K"})},
)
@triton.jit
def splora_rank_product_kernel(
    lhs_ptr, rhs_ptr, idx_ptr, out_ptr,
    M, K, R, scale,
    stride_lhs_m, stride_lhs_k,
    stride_rhs_k, stride_rhs_r,
    stride_out_m, stride_out_r,
    HAS_IDX: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    IN_INTERPRETER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out[m, j] = scale · Σ_k lhs[m, idx[k]] · rhs[idx[k], j]   (fp32 out, K = |idx|)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows = rows.to(tl.int64)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    ranks = ranks.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        channels, channel_ok = active_columns(idx_ptr, start, K, BLOCK_K, HAS_IDX)
        lhs = tl.load(
            lhs_ptr + rows[:, None] * stride_lhs_m + channels[None, :] * stride_lhs_k,
            mask=row_ok[:, None] & channel_ok[None, :], other=0.0,
        )
        rhs = tl.load(
            rhs_ptr + channels[:, None] * stride_rhs_k + ranks[None, :] * stride_rhs_r,
            mask=channel_ok[:, None] & rank_ok[None, :], other=0.0,
        )
        acc = mma(lhs, rhs, acc, INPUT_PRECISION, IN_INTERPRETER)
    tl.store(
        out_ptr + rows[:, None] * stride_out_m + ranks[None, :] * stride_out_r,
        acc * scale,
        mask=row_ok[:, None] & rank_ok[None, :],
    )


@triton.autotune(
    configs=_matmul_configs(),
    key=["M", "N", "K", "R"],
    prune_configs_by={"early_config_prune": prune_configs({"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "K"})},
)
@triton.jit
def splora_gathered_matmul_kernel(
    lhs_ptr, rhs_ptr, low_ptr, low_rhs_ptr, bias_ptr, k_idx_ptr, n_idx_ptr, out_ptr,
    M, N, K, R,
    stride_lhs_m, stride_lhs_k,
    stride_rhs_k, stride_rhs_n,
    stride_low_m, stride_low_r,
    stride_low_rhs_r, stride_low_rhs_n,
    stride_out_m, stride_out_n,
    HAS_K_IDX: tl.constexpr,
    HAS_N_IDX: tl.constexpr,
    HAS_LOW_RANK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    IN_INTERPRETER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP: tl.constexpr,
):
    """out[m, n_idx[n]] = Σ_k lhs[m, k_idx[k]] rhs[k_idx[k], n_idx[n]]
                          + Σ_j low[m, j] low_rhs[j, n_idx[n]] + bias[n_idx[n]]

    N = |n_idx| and K = |k_idx| count active channels only; ``low`` is fp32.
    """
    pid_m, pid_n = tile_coordinates(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows = rows.to(tl.int64)
    # This tile's output channels: loaded once, used by every K-step below.
    columns, column_ok = active_columns(n_idx_ptr, pid_n * BLOCK_N, N, BLOCK_N, HAS_N_IDX)

    lhs_rows = lhs_ptr + rows[:, None] * stride_lhs_m
    rhs_columns = rhs_ptr + columns[None, :] * stride_rhs_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        channels, channel_ok = active_columns(k_idx_ptr, start, K, BLOCK_K, HAS_K_IDX)
        lhs = tl.load(
            lhs_rows + channels[None, :] * stride_lhs_k,
            mask=row_ok[:, None] & channel_ok[None, :], other=0.0,
        )
        rhs = tl.load(
            rhs_columns + channels[:, None] * stride_rhs_k,
            mask=channel_ok[:, None] & column_ok[None, :], other=0.0,
        )
        acc = mma(lhs, rhs, acc, INPUT_PRECISION, IN_INTERPRETER)

    if HAS_LOW_RANK:
        # The adapter: R more K-steps over the fp32 rank-r product, rounded to
        # the input dtype like the rank-r intermediate of a PyTorch LoRA.
        for start in range(0, R, BLOCK_R):
            ranks = start + tl.arange(0, BLOCK_R)
            rank_ok = ranks < R
            ranks = ranks.to(tl.int64)
            low_rhs = tl.load(
                low_rhs_ptr + ranks[:, None] * stride_low_rhs_r + columns[None, :] * stride_low_rhs_n,
                mask=rank_ok[:, None] & column_ok[None, :], other=0.0,
            )
            low = tl.load(
                low_ptr + rows[:, None] * stride_low_m + ranks[None, :] * stride_low_r,
                mask=row_ok[:, None] & rank_ok[None, :], other=0.0,
            )
            acc = mma(round_to(low, low_rhs.dtype, IN_INTERPRETER), low_rhs, acc, INPUT_PRECISION, IN_INTERPRETER)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + columns, mask=column_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]

    tl.store(
        out_ptr + rows[:, None] * stride_out_m + columns[None, :] * stride_out_n,
        round_to(acc, out_ptr.dtype.element_ty, IN_INTERPRETER),
        mask=row_ok[:, None] & column_ok[None, :],
    )


# ---------------------------------------------------------------------------- launchers


def on_device(t: Tensor):
    """Launch on ``t``'s GPU, not the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def active_count(idx: Tensor | None, size: int) -> int:
    return size if idx is None else idx.numel()


def index_list(idx: Tensor | None, name: str, size: int, device: torch.device) -> Tensor | None:
    """``idx`` as contiguous int64 on ``device``; shape and dtype checked, values trusted."""
    if idx is None:
        return None
    if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be a 1-D int32/int64 tensor, got {idx.dtype} of shape {tuple(idx.shape)}")
    if idx.numel() > size:
        raise ValueError(f"{name} has {idx.numel()} entries for {size} channels")
    if idx.device != device:
        raise ValueError(f"{name} is on {idx.device} but the input is on {device}")
    return idx.to(torch.int64).contiguous()


def new_output(shape: tuple[int, ...], like: Tensor, all_written: bool, dtype: torch.dtype | None = None) -> Tensor:
    """Output buffer: uninitialised when kernels write every entry, else zeros (one memset)."""
    factory = torch.empty if all_written else torch.zeros
    return factory(shape, dtype=dtype or like.dtype, device=like.device)


def rank_product(lhs: Tensor, rhs: Tensor, idx: Tensor | None, scale: float) -> Tensor:
    """``scale · lhs[:, idx] @ rhs[idx, :]`` in fp32: (M, K_full) × (K_full, R) -> (M, R)."""
    rows, rank = lhs.shape[0], rhs.shape[1]
    out = torch.empty((rows, rank), dtype=torch.float32, device=lhs.device)
    if rows == 0:
        return out
    count = active_count(idx, lhs.shape[1])
    block_r = rank_block(rank)

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(rank, block_r))

    with on_device(lhs):
        splora_rank_product_kernel[grid](
            lhs, rhs, idx if idx is not None else out, out,
            rows, count, rank, float(scale),
            lhs.stride(0), lhs.stride(1),
            rhs.stride(0), rhs.stride(1),
            out.stride(0), out.stride(1),
            HAS_IDX=idx is not None,
            INPUT_PRECISION=dot_precision(lhs.dtype),
            IN_INTERPRETER=INTERPRETED,
            BLOCK_R=block_r,
        )
    return out


def gathered_matmul(
    lhs: Tensor,
    rhs: Tensor,
    k_idx: Tensor | None,
    n_idx: Tensor | None,
    out: Tensor,
    low: Tensor | None = None,
    low_rhs: Tensor | None = None,
    bias: Tensor | None = None,
) -> None:
    """Write ``lhs[:, k] @ rhs[k][:, n] + low @ low_rhs[:, n] + bias[n]`` into ``out[:, n]``.

    lhs (M, K_full), rhs (K_full, N_full), low (M, R) fp32, low_rhs (R, N_full),
    bias (N_full,), out (M, N_full); any strides.  Columns of ``out`` outside
    ``n_idx`` are left as they are.
    """
    rows = lhs.shape[0]
    k_count = active_count(k_idx, lhs.shape[1])
    n_count = active_count(n_idx, rhs.shape[1])
    if rows == 0 or n_count == 0:
        return
    rank = low.shape[1] if low is not None else 0
    # Unused pointers still need a tensor; their constexpr flag keeps them unread.
    placeholder = out

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(n_count, meta["BLOCK_N"]),)

    with on_device(lhs):
        splora_gathered_matmul_kernel[grid](
            lhs, rhs,
            low if low is not None else placeholder,
            low_rhs if low_rhs is not None else placeholder,
            bias if bias is not None else placeholder,
            k_idx if k_idx is not None else placeholder,
            n_idx if n_idx is not None else placeholder,
            out,
            rows, n_count, k_count, rank,
            lhs.stride(0), lhs.stride(1),
            rhs.stride(0), rhs.stride(1),
            *(low.stride() if low is not None else (0, 0)),
            *(low_rhs.stride() if low_rhs is not None else (0, 0)),
            out.stride(0), out.stride(1),
            HAS_K_IDX=k_idx is not None,
            HAS_N_IDX=n_idx is not None,
            HAS_LOW_RANK=low is not None,
            HAS_BIAS=bias is not None,
            INPUT_PRECISION=dot_precision(lhs.dtype),
            IN_INTERPRETER=INTERPRETED,
            BLOCK_R=rank_block(max(rank, 1)),
            GROUP=GROUP_M,
        )


def check_linear_operands(
    x: Tensor, weight: Tensor, lora_a: Tensor | None, lora_b: Tensor | None, bias: Tensor | None
) -> None:
    """Shapes, dtypes and devices a launch relies on (values are the caller's)."""
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"x and weight must be 2-D, got {tuple(x.shape)} and {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.shape[1] != in_features:
        raise ValueError(f"x has {x.shape[1]} features but weight expects {in_features}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together (or both None)")
    named = {"weight": weight, "lora_a": lora_a, "lora_b": lora_b, "bias": bias}
    for name, t in named.items():
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}")
    if lora_a is not None:
        rank = lora_a.shape[0]
        if lora_a.dim() != 2 or lora_a.shape[1] != in_features or tuple(lora_b.shape) != (out_features, rank):
            raise ValueError(
                f"lora_a must be (r, {in_features}) and lora_b ({out_features}, r), "
                f"got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}"
            )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")


def splora_linear_forward(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    bias: Tensor | None,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    scale: float,
) -> Tensor:
    """y (M, out) = masked SPLoRA linear of x (M, in); see the module docstring."""
    check_linear_operands(x, weight, lora_a, lora_b, bias)
    out_features, in_features = weight.shape
    in_idx = index_list(in_idx, "in_idx", in_features, x.device)
    out_idx = index_list(out_idx, "out_idx", out_features, x.device)
    n_active = active_count(out_idx, out_features)
    y = new_output((x.shape[0], out_features), x, all_written=n_active == out_features)
    if x.shape[0] == 0 or n_active == 0:
        return y
    low = rank_product(x, lora_a.t(), in_idx, scale) if lora_a is not None else None
    gathered_matmul(
        x, weight.t(), in_idx, out_idx, y,
        low=low, low_rhs=lora_b.t() if lora_b is not None else None, bias=bias,
    )
    return y
