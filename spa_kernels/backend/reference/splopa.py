"""Block-SPA (SPLoPA) linear in plain PyTorch, forward and explicit backward.

Shapes: x (M, in), weight (out, in), prototype_rows V (K, r, q), prototype_cols
U (K, p, r), pos_weights Φ (K, out/p, in/q), bias (out,), block_mask (out/p, in/q)
bool or None (all blocks active).  The prototypes are Π_k = U_k V_k (p × q) and
the adapter's block (i, j) is ΔW_ij = Σ_k Φ[k, i, j] Π_k.

Only active blocks are read or multiplied: the effective blocks W_ij + s ΔW_ij
are gathered as an (active, p, q) tensor and each block row of the output is one
product with the active input blocks of that row.  Nothing of size
(K, out, in) or (out, in) is built except the weight gradient asked for.
This is the oracle the other backends are tested against; clarity first.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ActiveBlocks:
    """The active blocks of a block mask in row-major order, grouped by block row."""

    def __init__(self, block_mask: Tensor | None, block_rows: int, block_cols: int, device: torch.device) -> None:
        if block_mask is None:
            block_mask = torch.ones(block_rows, block_cols, dtype=torch.bool, device=device)
        self.rows, self.cols = block_mask.nonzero(as_tuple=True)  # row-major, so grouped by block row
        self.per_row = block_mask.sum(1).tolist()

    def by_row(self):
        """(block row, positions in the active list, their block columns) for rows with active blocks."""
        start = 0
        for row, count in enumerate(self.per_row):
            if count:
                yield row, slice(start, start + count), self.cols[start:start + count]
            start += count


def prototypes(prototype_rows: Tensor, prototype_cols: Tensor) -> Tensor:
    """Π (K, p, q) = U V."""
    return prototype_cols @ prototype_rows


def _weight_blocks(weight: Tensor, p: int, q: int, blocks: ActiveBlocks) -> Tensor:
    """The active blocks of ``weight`` as (active, p, q)."""
    out_features, in_features = weight.shape
    return weight.view(out_features // p, p, in_features // q, q)[blocks.rows, :, blocks.cols, :]


def _effective_blocks(weight, prototype_rows, prototype_cols, pos_weights, blocks, scale) -> tuple[Tensor, Tensor]:
    """(W_ij + s ΔW_ij for the active blocks as (active, p, q), Π)."""
    pi = prototypes(prototype_rows, prototype_cols)
    k, p, q = pi.shape
    active_phi = pos_weights[:, blocks.rows, blocks.cols]  # (K, active)
    delta = (active_phi.t() @ pi.reshape(k, p * q)).view(-1, p, q)
    return _weight_blocks(weight, p, q, blocks) + scale * delta, pi


def _row_operand(blocks_of_row: Tensor) -> Tensor:
    """(n, p, q) blocks of one block row as the (p, n·q) matrix they form side by side."""
    n, p, q = blocks_of_row.shape
    return blocks_of_row.permute(1, 0, 2).reshape(p, n * q)


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
    m, in_features = x.shape
    out_features = weight.shape[0]
    p, q = prototype_cols.shape[1], prototype_rows.shape[2]
    blocks = ActiveBlocks(block_mask, out_features // p, in_features // q, x.device)
    effective, _ = _effective_blocks(weight, prototype_rows, prototype_cols, pos_weights, blocks, scale)
    x_blocks = x.view(m, in_features // q, q)
    y = x.new_zeros(m, out_features // p, p)
    for row, active, cols in blocks.by_row():
        y[:, row] = x_blocks[:, cols].reshape(m, -1) @ _row_operand(effective[active]).t()
    y = y.view(m, out_features)
    return y if bias is None else y + bias


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
    """Gradients of (x, weight, prototype_rows, prototype_cols, pos_weights, bias); ``None`` where not asked for.

    With G_ij = dy_iᵀ x_j (p × q) for each active block:
    dx_j = Σ_i dy_i (W_ij + s ΔW_ij),  dW_ij = G_ij,  dΦ[k, i, j] = s ⟨G_ij, Π_k⟩,
    dΠ_k = s Σ_ij Φ[k, i, j] G_ij,  dU_k = dΠ_k V_kᵀ,  dV_k = U_kᵀ dΠ_k,  db = Σ dy.
    """
    need_x, need_w, need_rows, need_cols, need_phi, need_bias = output_mask
    m, in_features = x.shape
    out_features = weight.shape[0]
    k, p, q = prototype_cols.shape[0], prototype_cols.shape[1], prototype_rows.shape[2]
    block_rows, block_cols = out_features // p, in_features // q
    blocks = ActiveBlocks(block_mask, block_rows, block_cols, x.device)
    dy_blocks = grad_out.view(m, block_rows, p)
    x_blocks = x.view(m, block_cols, q)

    grad_x = grad_w = grad_rows = grad_cols = grad_phi = grad_bias = None
    if need_x:
        effective, _ = _effective_blocks(weight, prototype_rows, prototype_cols, pos_weights, blocks, scale)
        dx_blocks = x.new_zeros(m, block_cols, q)
        for row, active, cols in blocks.by_row():
            dx_blocks.index_add_(1, cols, (dy_blocks[:, row] @ _row_operand(effective[active])).view(m, -1, q))
        grad_x = dx_blocks.view(m, in_features)
    if need_w or need_rows or need_cols or need_phi:
        g = x.new_empty(blocks.rows.numel(), p, q)
        for row, active, cols in blocks.by_row():
            g[active] = (dy_blocks[:, row].t() @ x_blocks[:, cols].reshape(m, -1)).view(p, -1, q).permute(1, 0, 2)
        if need_w:
            grad_w = weight.new_zeros(block_rows, p, block_cols, q)
            grad_w[blocks.rows, :, blocks.cols, :] = g
            grad_w = grad_w.view(out_features, in_features)
        g_flat = g.reshape(-1, p * q)
        if need_phi:
            pi = prototypes(prototype_rows, prototype_cols)
            grad_phi = torch.zeros_like(pos_weights)
            grad_phi[:, blocks.rows, blocks.cols] = scale * (pi.reshape(k, p * q) @ g_flat.t())
        if need_rows or need_cols:
            active_phi = pos_weights[:, blocks.rows, blocks.cols]  # (K, active)
            grad_pi = (scale * (active_phi @ g_flat)).view(k, p, q)
            if need_rows:
                grad_rows = prototype_cols.transpose(1, 2) @ grad_pi
            if need_cols:
                grad_cols = grad_pi @ prototype_rows.transpose(1, 2)
    if need_bias:
        grad_bias = grad_out.sum(0)
    return grad_x, grad_w, grad_rows, grad_cols, grad_phi, grad_bias
