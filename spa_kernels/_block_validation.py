"""Argument checks of the block-SPA (SPLoPA) entry points.

Like ``_validation``, everything here runs before any kernel, so a bad call
fails with a message that names the argument.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import check_float_tensor, check_scale, check_tensor


def block_shape_of(prototype_rows: Tensor, prototype_cols: Tensor) -> tuple[int, int]:
    """(p, q): prototype_cols is (K, p, r) and prototype_rows is (K, r, q)."""
    return prototype_cols.shape[1], prototype_rows.shape[2]


def check_block_mask(block_mask: object, name: str, block_rows: int, block_cols: int,
                     device: torch.device | None = None) -> Tensor:
    """A bool ``(block_rows, block_cols)`` tensor (on ``device`` when given)."""
    if not isinstance(block_mask, Tensor):
        raise TypeError(f"{name} must be a bool tensor, got {type(block_mask).__name__}")
    if block_mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool, got {block_mask.dtype}")
    if tuple(block_mask.shape) != (block_rows, block_cols):
        raise ValueError(f"{name} must have shape (out/p, in/q) = ({block_rows}, {block_cols}), "
                         f"got {tuple(block_mask.shape)}")
    if device is not None and block_mask.device != device:
        raise ValueError(f"{name} is on {block_mask.device} but the input is on {device}")
    return block_mask


def check_splopa_linear_args(x, weight, prototype_rows, prototype_cols, pos_weights, bias, block_mask, scale):
    """Validate the arguments of ``splopa_linear``; return the scale as a float."""
    check_tensor(x, "x", min_ndim=1)
    check_tensor(weight, "weight", ndim=2)
    check_tensor(prototype_rows, "prototype_rows", ndim=3)
    check_tensor(prototype_cols, "prototype_cols", ndim=3)
    check_tensor(pos_weights, "pos_weights", ndim=3)
    check_float_tensor(x, "x", x, "x")
    for tensor, name in ((weight, "weight"), (prototype_rows, "prototype_rows"),
                         (prototype_cols, "prototype_cols"), (pos_weights, "pos_weights")):
        check_float_tensor(tensor, name, x, "x")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but weight expects {in_features}")
    num_prototypes, rank, q = prototype_rows.shape
    if num_prototypes < 1:
        raise ValueError(f"prototype_rows must hold at least one prototype, got shape {tuple(prototype_rows.shape)}")
    if prototype_cols.shape[0] != num_prototypes or pos_weights.shape[0] != num_prototypes:
        raise ValueError(
            f"mismatched number of prototypes K: prototype_rows has {num_prototypes}, prototype_cols has "
            f"{prototype_cols.shape[0]}, pos_weights has {pos_weights.shape[0]}")
    if rank < 1:
        raise ValueError(f"prototype_rows must have rank >= 1, got shape {tuple(prototype_rows.shape)}")
    if prototype_cols.shape[2] != rank:
        raise ValueError(f"mismatched prototype rank: prototype_rows (K, r, q) has r={rank} but prototype_cols "
                         f"(K, p, r) has r={prototype_cols.shape[2]}")
    p = prototype_cols.shape[1]
    if p < 1 or q < 1:
        raise ValueError(f"the block shape (p, q) = ({p}, {q}) read from the prototypes must be positive")
    if out_features % p != 0:
        raise ValueError(f"weight has {out_features} output features, not divisible by the block height p={p} "
                         f"(prototype_cols is (K, p, r) = {tuple(prototype_cols.shape)})")
    if in_features % q != 0:
        raise ValueError(f"weight has {in_features} input features, not divisible by the block width q={q} "
                         f"(prototype_rows is (K, r, q) = {tuple(prototype_rows.shape)})")
    block_rows, block_cols = out_features // p, in_features // q
    if tuple(pos_weights.shape) != (num_prototypes, block_rows, block_cols):
        raise ValueError(f"pos_weights must have shape (K, out/p, in/q) = ({num_prototypes}, {block_rows}, "
                         f"{block_cols}), got {tuple(pos_weights.shape)}")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
        check_float_tensor(bias, "bias", x, "x")
        if bias.shape[0] != out_features:
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    if block_mask is not None:
        check_block_mask(block_mask, "block_mask", block_rows, block_cols, x.device)
    return check_scale(scale)
