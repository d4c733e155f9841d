r"""Block-SPA (SPLoPA) linear in Triton: the backward pass.

Math (``dy`` = grad of y, M × out; ``G_ij = dy_iᵀ x_j``, p × q, for each active
block; ``Π_k = U_k V_k``; ``s = scale``)::

    dx_j        = Σ_{i active in column j} dy_i (W_ij + s ΔW_ij)
    dW_ij       = G_ij                        (zero at pruned blocks; only when asked)
    dΦ[k, i, j] = s ⟨G_ij, Π_k⟩                (zero at pruned blocks)
    dΠ_k        = s Σ_ij Φ[k, i, j] G_ij,   dU_k = dΠ_k V_kᵀ,   dV_k = U_kᵀ dΠ_k
    db          = Σ_m dy[m]

``dx`` is the forward's block-sparse product (``splopa.block_matmul``) on the
transposed problem: groups are block columns, the depth runs over the active
block rows of each column, and W, U, V and Φ are read through transposed
strides, ΔW again built in registers.

``splopa_block_gradient_kernel`` computes the ``G_ij`` of every active block,
reducing over the M rows in fp32.  Its programs tile a block row's active
blocks side by side (as the forward tiles its depth), so narrow blocks share a
tile.  It stores ``G`` as an fp32 (active, p, q) stack when dΦ, dU or dV are
asked for, and into the masked ``dW`` when that is asked for, from the same
accumulator.  The small contractions with Φ and the prototypes then run as
PyTorch products on that stack: K · active · p · q multiply-adds, the cost of
one forward row per prototype.  Nothing of size (K, out, in) is built, and no
out × in tensor except the ``dW`` asked for.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..._block_validation import check_splopa_linear_args
from .linear import INTERPRETED, dot_precision, mma, on_device, prune_configs, round_to, tile_configs
from .linear_backward import bias_grad
from .splopa import ActiveBlockLists, active_block_lists, block_matmul


def _block_gradient_configs() -> list[triton.Config]:
    # (BLOCK_P, BLOCK_K, BLOCK_M, warps, stages): a p-tall, depth-wide tile
    # reduced over the rows in BLOCK_M steps.
    shapes = [
        (128, 128, 32, 8, 3),
        (64, 128, 32, 4, 3),
        (64, 64, 64, 4, 3),
        (32, 64, 64, 4, 3),
        (32, 32, 64, 2, 4),
        (16, 64, 64, 2, 4),
    ]
    return tile_configs(("BLOCK_P", "BLOCK_K", "BLOCK_M"), shapes, interpreted=(16, 16, 16))


# ---------------------------------------------------------------------------- kernel


@triton.autotune(
    configs=_block_gradient_configs(),
    key=["M", "GROUPS", "P", "Q", "MAX_DEPTH"],
    prune_configs_by={"early_config_prune": prune_configs({"BLOCK_P": "P", "BLOCK_K": "MAX_DEPTH"})},
)
@triton.jit
def splopa_block_gradient_kernel(
    dy_ptr, x_ptr, blocks_ptr, counts_ptr, starts_ptr, stack_ptr, grad_weight_ptr,
    M, GROUPS, P, Q, MAX_DEPTH,
    stride_dy_m, stride_dy_o,
    stride_x_m, stride_x_c,
    stride_blocks_group,
    stride_stack_a, stride_stack_o, stride_stack_c,
    stride_grad_weight_o, stride_grad_weight_c,
    WRITE_STACK: tl.constexpr,
    WRITE_WEIGHT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    IN_INTERPRETER: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """G[i, o, c] = Σ_m dy[m, i·P + o] x[m, c] for the channels c of block row i's active blocks.

    Stored to stack[starts[i] + slot, o, c mod Q] (slot: the block's place in the
    row's list) and/or grad_weight[i·P + o, c].  MAX_DEPTH = Q · (most active
    blocks in a row); programs past a row's depth reduce nothing and store nothing.
    """
    depth_tiles = tl.cdiv(MAX_DEPTH, BLOCK_K)
    p_tiles = tl.cdiv(P, BLOCK_P)
    pid = tl.program_id(0)
    depth_tile = pid % depth_tiles
    group = (pid // depth_tiles // p_tiles).to(tl.int64)
    p_tile = (pid // depth_tiles) % p_tiles

    depth = tl.load(counts_ptr + group) * Q
    position = depth_tile * BLOCK_K + tl.arange(0, BLOCK_K)
    position_ok = position < depth
    slot = position // Q
    block = tl.load(blocks_ptr + group * stride_blocks_group + slot, mask=position_ok, other=0).to(tl.int64)
    within_c = (position % Q).to(tl.int64)
    channels = block * Q + within_c
    within_o = p_tile * BLOCK_P + tl.arange(0, BLOCK_P)
    o_ok = within_o < P
    within_o = within_o.to(tl.int64)
    out_channels = group * P + within_o

    # A program past this row's depth has nothing to reduce.
    rows_to_reduce = tl.where(depth_tile * BLOCK_K < depth, M, 0)
    acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    for start in range(0, rows_to_reduce, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows = rows.to(tl.int64)
        # dy loaded already transposed (channels × rows): the dot wants dyᵀ.
        dy = tl.load(
            dy_ptr + out_channels[:, None] * stride_dy_o + rows[None, :] * stride_dy_m,
            mask=o_ok[:, None] & row_ok[None, :], other=0.0,
        )
        x = tl.load(
            x_ptr + rows[:, None] * stride_x_m + channels[None, :] * stride_x_c,
            mask=row_ok[:, None] & position_ok[None, :], other=0.0,
        )
        acc = mma(dy, x, acc, INPUT_PRECISION, IN_INTERPRETER)

    store_ok = o_ok[:, None] & position_ok[None, :]
    if WRITE_STACK:
        active = tl.load(starts_ptr + group).to(tl.int64) + slot.to(tl.int64)
        tl.store(
            stack_ptr + active[None, :] * stride_stack_a + within_o[:, None] * stride_stack_o
            + within_c[None, :] * stride_stack_c,
            acc, mask=store_ok,
        )
    if WRITE_WEIGHT:
        tl.store(
            grad_weight_ptr + out_channels[:, None] * stride_grad_weight_o + channels[None, :] * stride_grad_weight_c,
            round_to(acc, grad_weight_ptr.dtype.element_ty, IN_INTERPRETER), mask=store_ok,
        )


# ---------------------------------------------------------------------------- launchers


def block_gradients(
    grad_out: Tensor,
    x: Tensor,
    lists: ActiveBlockLists,
    block_shape: tuple[int, int],
    most_active: int,
    stack: Tensor | None,
    grad_weight: Tensor | None,
) -> None:
    """Write ``G_ij = dy_iᵀ x_j`` of every active block into ``stack`` (active, p, q) fp32, in row-major
    order of the blocks, and/or into the active blocks of ``grad_weight`` (out, in).

    ``most_active``: the largest number of active blocks in one block row.
    """
    rows = x.shape[0]
    groups = lists.counts.shape[0]
    p, q = block_shape
    if rows == 0 or groups == 0 or most_active == 0 or (stack is None and grad_weight is None):
        return
    starts = torch.cumsum(lists.counts, 0, dtype=torch.int64) - lists.counts
    target = stack if stack is not None else grad_weight
    max_depth = most_active * q

    def grid(meta):
        return (groups * triton.cdiv(p, meta["BLOCK_P"]) * triton.cdiv(max_depth, meta["BLOCK_K"]),)

    with on_device(x):
        splopa_block_gradient_kernel[grid](
            grad_out, x, lists.blocks, lists.counts, starts,
            stack if stack is not None else target,
            grad_weight if grad_weight is not None else target,
            rows, groups, p, q, max_depth,
            grad_out.stride(0), grad_out.stride(1),
            x.stride(0), x.stride(1),
            lists.blocks.stride(0),
            *(stack.stride() if stack is not None else (0, 0, 0)),
            *(grad_weight.stride() if grad_weight is not None else (0, 0)),
            WRITE_STACK=stack is not None,
            WRITE_WEIGHT=grad_weight is not None,
            INPUT_PRECISION=dot_precision(x.dtype),
            IN_INTERPRETER=INTERPRETED,
        )


def splopa_linear_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    prototype_rows: Tensor,
    prototype_cols: Tensor,
    pos_weights: Tensor,
    block_mask: Tensor | None,
    scale: float,
    output_mask: tuple[bool, bool, bool, bool, bool, bool],
) -> tuple[Tensor | None, ...]:
    """Gradients of (x, weight, prototype_rows, prototype_cols, pos_weights, bias); ``None`` where not asked for."""
    check_splopa_linear_args(x, weight, prototype_rows, prototype_cols, pos_weights, None, block_mask, scale)
    out_features, in_features = weight.shape
    if x.dim() != 2 or tuple(grad_out.shape) != (x.shape[0], out_features) or grad_out.dtype != x.dtype:
        raise ValueError(
            f"x must be 2-D and grad_out {x.dtype} of shape (rows of x, {out_features}), "
            f"got x {tuple(x.shape)} and grad_out {grad_out.dtype} {tuple(grad_out.shape)}"
        )
    need_x, need_w, need_rows, need_cols, need_phi, need_bias = (bool(m) for m in output_mask)
    num_prototypes, block_rows, block_cols = pos_weights.shape
    p, q = prototype_cols.shape[1], prototype_rows.shape[2]

    grad_x = grad_w = grad_rows = grad_cols = grad_phi = grad_bias = None
    if need_x:
        # Every entry is written: an input block column without active blocks gets zeros.
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        by_column = active_block_lists(block_mask, block_cols, block_rows, x.device, transposed=True)
        block_matmul(grad_out, weight.t(), prototype_rows.transpose(1, 2), prototype_cols.transpose(1, 2),
                     pos_weights.transpose(1, 2), by_column, grad_x, scale)

    need_stack = need_rows or need_cols or need_phi
    if need_w or need_stack:
        by_row = active_block_lists(block_mask, block_rows, block_cols, x.device)
        if block_mask is None:
            block_row_of, block_col_of = (t.reshape(-1) for t in torch.meshgrid(
                torch.arange(block_rows, device=x.device), torch.arange(block_cols, device=x.device), indexing="ij"))
        else:
            block_row_of, block_col_of = block_mask.nonzero(as_tuple=True)  # row-major: the stack's order
        active = block_row_of.numel()
        most_active = int(by_row.counts.max()) if active else 0
        # Uninitialised only where the kernel writes every entry.
        every_block_written = x.shape[0] > 0 and active == block_rows * block_cols
        if need_stack:
            stack = (torch.empty if x.shape[0] > 0 else torch.zeros)((active, p, q), dtype=torch.float32,
                                                                     device=x.device)
        else:
            stack = None
        if need_w:
            grad_w = torch.empty_like(weight) if every_block_written else torch.zeros_like(weight)
        block_gradients(grad_out, x, by_row, (p, q), most_active, stack, grad_w)

        if need_stack:
            g_flat = stack.view(active, p * q)
            if need_phi:
                prototypes = prototype_cols.float() @ prototype_rows.float()  # Π (K, p, q)
                grad_phi = torch.zeros_like(pos_weights)
                grad_phi[:, block_row_of, block_col_of] = (
                    scale * (prototypes.view(num_prototypes, p * q) @ g_flat.t())).to(pos_weights.dtype)
            if need_rows or need_cols:
                active_phi = pos_weights[:, block_row_of, block_col_of].float()  # (K, active)
                grad_prototypes = (scale * (active_phi @ g_flat)).view(num_prototypes, p, q)
                if need_rows:
                    grad_rows = (prototype_cols.float().transpose(1, 2) @ grad_prototypes).to(prototype_rows.dtype)
                if need_cols:
                    grad_cols = (grad_prototypes @ prototype_rows.float().transpose(1, 2)).to(prototype_cols.dtype)
    if need_bias:
        grad_bias = torch.empty(out_features, dtype=grad_out.dtype, device=grad_out.device)
        bias_grad(grad_out, None, grad_bias)
    return grad_x, grad_w, grad_rows, grad_cols, grad_phi, grad_bias

