r"""Block-SPA (SPLoPA) linear in Triton: the forward pass and the block-sparse product it shares with backward.

Math (p × q blocks, ``s = scale``, prototypes ``Π_k = U_k V_k``)::

    ΔW_ij    = Σ_k Φ[k, i, j] U_k V_k                                   (p × q)
    y[:, i]  = Σ_{j active in row i} x[:, j] (W_ij + s ΔW_ij)ᵀ + b_i      (M × p)

Shapes: x (M, in), weight W (out, in), prototype_rows V (K, r, q),
prototype_cols U (K, p, r), pos_weights Φ (K, out/p, in/q), bias b (out,),
block_mask (out/p, in/q) bool or None (every block active).

``splopa_block_matmul_kernel`` computes, for groups g of ``OUT_BLOCK`` output
channels each::

    out[:, g] = Σ_{b active in g} lhs[:, b] (W_gb + s ΔW_gb)ᵀ  (+ bias[g])

Forward: groups are block rows (out_block = p, red_block = q).  Backward dx
(``splopa_backward.py``): lhs = dy, groups are block columns (out_block = q,
red_block = p) and every operand is read through its transposed strides.

The depth of a group is the concatenation of its active blocks, so a K-step of
``BLOCK_K`` channels may span several narrow blocks (a 4-wide block does not pad
a 16-wide step).  ``active_block_lists`` gives each group its active blocks
first, in increasing order, and their count: an ELL layout of the mask, built
on the device without a host synchronisation.  Inactive blocks are never read.

ΔW never exists in memory.  Each K-step builds its (BLOCK_K, BLOCK_N) tile of
``ΔWᵀ`` in registers as one more product, over the K·r prototype ranks::

    ΔWᵀ[c, n] = Σ_{k,t} (V_k[t, c mod q] · Φ[k, g, block(c)]) · U_k[n mod p, t]

adds ``W`` and the scale in fp32, rounds the effective tile to the input dtype
(a half-precision tile feeds the tensor cores like any weight tile) and
accumulates ``lhs @ tile`` in fp32.  The tile is rebuilt by every row tile of
the output: K·r extra multiply-adds per weight element and row tile, against
BLOCK_M for the main product.

Every output entry is written (zero plus bias for a block row with no active
block), so the output is allocated uninitialised.  Offsets multiplied by a
stride are int64.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..._block_validation import check_splopa_linear_args
from .linear import (
    GROUP_M,
    INTERPRETED,
    dot_precision,
    mma,
    on_device,
    prune_configs,
    rank_block,
    round_to,
    tile_configs,
    tile_coordinates,
)


def _block_matmul_configs() -> list[triton.Config]:
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).  BLOCK_N tiles one block's
    # height (p, or q for dx), so narrow tiles are kept for 16- and 32-high blocks.
    shapes = [
        (128, 128, 32, 8, 3),
        (128, 64, 32, 4, 3),
        (64, 128, 32, 4, 3),
        (64, 64, 32, 4, 3),
        (128, 32, 32, 4, 3),
        (64, 32, 64, 4, 3),
        (64, 16, 64, 2, 3),
        (32, 64, 32, 2, 4),  # decode-sized batches
        (16, 32, 64, 2, 4),
    ]
    # In the interpreter, one small config: the tests' 4- and 8-wide blocks pack several
    # blocks per K-step and several row tiles per group.
    return tile_configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), shapes, interpreted=(16, 16, 16))


# ---------------------------------------------------------------------------- kernel


@triton.autotune(
    configs=_block_matmul_configs(),
    key=["M", "GROUPS", "OUT_BLOCK", "RED_BLOCK", "RANKS"],
    prune_configs_by={"early_config_prune": prune_configs({"BLOCK_M": "M", "BLOCK_N": "OUT_BLOCK"})},
)
@triton.jit
def splopa_block_matmul_kernel(
    lhs_ptr, weight_ptr, out_factor_ptr, red_factor_ptr, phi_ptr, bias_ptr, blocks_ptr, counts_ptr, out_ptr,
    M, GROUPS, OUT_BLOCK, RED_BLOCK, RANK, RANKS, scale,
    stride_lhs_m, stride_lhs_c,
    stride_weight_n, stride_weight_c,
    stride_out_factor_k, stride_out_factor_n, stride_out_factor_t,
    stride_red_factor_k, stride_red_factor_t, stride_red_factor_c,
    stride_phi_k, stride_phi_group, stride_phi_block,
    stride_blocks_group,
    stride_out_m, stride_out_n,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    IN_INTERPRETER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_KR: tl.constexpr,
    GROUP: tl.constexpr,
):
    """out[m, g·OUT_BLOCK + n] = Σ_c lhs[m, c] (weight[n, c] + scale ΔW[n, c]) + bias[g·OUT_BLOCK + n]

    over the channels c of group g's active blocks, with
    ΔW[n, c] = Σ_{k<K, t<RANK} out_factor[k, n mod OUT_BLOCK, t] · phi[k, g, c div RED_BLOCK]
    · red_factor[k, t, c mod RED_BLOCK].  RANKS = K·RANK; ``weight`` is indexed
    by full channel numbers (n as g·OUT_BLOCK + n), the factors by channels
    within a block.
    """
    tiles_per_group = tl.cdiv(OUT_BLOCK, BLOCK_N)
    pid_m, pid_column = tile_coordinates(tl.program_id(0), M, GROUPS * tiles_per_group, BLOCK_M, 1, GROUP)
    group = (pid_column // tiles_per_group).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows = rows.to(tl.int64)
    within_n = (pid_column % tiles_per_group) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = within_n < OUT_BLOCK
    within_n = within_n.to(tl.int64)
    columns = group * OUT_BLOCK + within_n

    depth = tl.load(counts_ptr + group) * RED_BLOCK
    group_blocks = blocks_ptr + group * stride_blocks_group
    group_phi = phi_ptr + group * stride_phi_group
    lhs_rows = lhs_ptr + rows[:, None] * stride_lhs_m
    weight_columns = weight_ptr + columns[None, :] * stride_weight_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, depth, BLOCK_K):
        position = start + tl.arange(0, BLOCK_K)
        position_ok = position < depth
        block = tl.load(group_blocks + position // RED_BLOCK, mask=position_ok, other=0).to(tl.int64)
        within_c = (position % RED_BLOCK).to(tl.int64)
        channels = block * RED_BLOCK + within_c
        lhs = tl.load(
            lhs_rows + channels[None, :] * stride_lhs_c,
            mask=row_ok[:, None] & position_ok[None, :], other=0.0,
        )
        weight = tl.load(
            weight_columns + channels[:, None] * stride_weight_c,
            mask=position_ok[:, None] & n_ok[None, :], other=0.0,
        )

        # This step's tile of ΔWᵀ (BLOCK_K × BLOCK_N), one rank block at a time.
        delta = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for rank_start in range(0, RANKS, BLOCK_KR):
            ranks = rank_start + tl.arange(0, BLOCK_KR)
            rank_ok = ranks < RANKS
            prototype = (ranks // RANK).to(tl.int64)
            within_rank = (ranks % RANK).to(tl.int64)
            step_ok = position_ok[:, None] & rank_ok[None, :]
            red_factor = tl.load(
                red_factor_ptr + prototype[None, :] * stride_red_factor_k
                + within_rank[None, :] * stride_red_factor_t + within_c[:, None] * stride_red_factor_c,
                mask=step_ok, other=0.0,
            )
            phi = tl.load(
                group_phi + prototype[None, :] * stride_phi_k + block[:, None] * stride_phi_block,
                mask=step_ok, other=0.0,
            )
            weighted = round_to(red_factor.to(tl.float32) * phi.to(tl.float32), red_factor.dtype, IN_INTERPRETER)
            out_factor = tl.load(
                out_factor_ptr + prototype[:, None] * stride_out_factor_k
                + within_rank[:, None] * stride_out_factor_t + within_n[None, :] * stride_out_factor_n,
                mask=rank_ok[:, None] & n_ok[None, :], other=0.0,
            )
            delta = mma(weighted, out_factor, delta, INPUT_PRECISION, IN_INTERPRETER)

        effective = round_to(weight.to(tl.float32) + scale * delta, lhs.dtype, IN_INTERPRETER)
        acc = mma(lhs, effective, acc, INPUT_PRECISION, IN_INTERPRETER)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + columns, mask=n_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(
        out_ptr + rows[:, None] * stride_out_m + columns[None, :] * stride_out_n,
        round_to(acc, out_ptr.dtype.element_ty, IN_INTERPRETER),
        mask=row_ok[:, None] & n_ok[None, :],
    )


# ---------------------------------------------------------------------------- launchers


@dataclasses.dataclass(frozen=True)
class ActiveBlockLists:
    """Per group (a block row, or a block column of the transposed mask), its active blocks.

    ``blocks`` (groups, blocks per group) int32 holds each group's active block
    numbers first, in increasing order (the rest of the row is unused);
    ``counts`` (groups,) int32 how many there are.
    """

    blocks: Tensor
    counts: Tensor


def active_block_lists(block_mask: Tensor | None, groups: int, blocks_per_group: int, device: torch.device,
                       *, transposed: bool = False) -> ActiveBlockLists:
    """The active blocks of each row of ``block_mask`` (of each column with ``transposed``); no host sync.

    ``groups`` × ``blocks_per_group`` is the mask's shape after the transposition;
    ``None`` means every block is active.
    """
    if block_mask is None:
        blocks = torch.arange(blocks_per_group, dtype=torch.int32, device=device).expand(groups, blocks_per_group)
        return ActiveBlockLists(blocks, torch.full((groups,), blocks_per_group, dtype=torch.int32, device=device))
    mask = block_mask.t() if transposed else block_mask
    # A stable sort of "inactive" puts each group's active blocks first, in order.
    blocks = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices.to(torch.int32).contiguous()
    return ActiveBlockLists(blocks, mask.sum(1, dtype=torch.int32))


def block_matmul(
    lhs: Tensor,
    weight: Tensor,
    out_factor: Tensor,
    red_factor: Tensor,
    phi: Tensor,
    lists: ActiveBlockLists,
    out: Tensor,
    scale: float,
    bias: Tensor | None = None,
) -> None:
    """Write the block-sparse product of the module docstring into ``out``.

    lhs (M, C) with C = blocks per group · RED_BLOCK, weight (N, C) with
    N = groups · OUT_BLOCK, out_factor (K, OUT_BLOCK, r), red_factor
    (K, r, RED_BLOCK), phi (K, groups, blocks per group), bias (N,), out (M, N);
    any strides, so transposed views serve the backward pass.
    """
    rows = lhs.shape[0]
    groups = lists.counts.shape[0]
    num_prototypes, out_block, rank = out_factor.shape
    red_block = red_factor.shape[2]
    if rows == 0 or groups == 0:
        return
    placeholder = out

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * groups * triton.cdiv(out_block, meta["BLOCK_N"]),)

    with on_device(lhs):
        splopa_block_matmul_kernel[grid](
            lhs, weight, out_factor, red_factor, phi,
            bias if bias is not None else placeholder,
            lists.blocks, lists.counts, out,
            rows, groups, out_block, red_block, rank, num_prototypes * rank, float(scale),
            lhs.stride(0), lhs.stride(1),
            weight.stride(0), weight.stride(1),
            out_factor.stride(0), out_factor.stride(1), out_factor.stride(2),
            red_factor.stride(0), red_factor.stride(1), red_factor.stride(2),
            phi.stride(0), phi.stride(1), phi.stride(2),
            lists.blocks.stride(0),
            out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None,
            INPUT_PRECISION=dot_precision(lhs.dtype),
            IN_INTERPRETER=INTERPRETED,
            BLOCK_KR=rank_block(num_prototypes * rank),  # the prototype ranks K·r
            GROUP=GROUP_M,
        )


def splopa_linear_forward(
    x: Tensor,
    weight: Tensor,
    prototype_rows: Tensor,
    prototype_cols: Tensor,
    pos_weights: Tensor,
    bias: Tensor | None,
    block_mask: Tensor | None,
    scale: float,
) -> Tensor:
    """y (M, out) = block-SPA linear of x (M, in); see the module docstring."""
    check_splopa_linear_args(x, weight, prototype_rows, prototype_cols, pos_weights, bias, block_mask, scale)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D here (the op flattens leading dimensions), got {tuple(x.shape)}")
    out_features = weight.shape[0]
    _, block_rows, block_cols = pos_weights.shape
    y = torch.empty((x.shape[0], out_features), dtype=x.dtype, device=x.device)
    lists = active_block_lists(block_mask, block_rows, block_cols, x.device)
    block_matmul(x, weight, prototype_cols, prototype_rows, pos_weights, lists, y, scale, bias=bias)
    return y
