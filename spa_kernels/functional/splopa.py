"""Functional block-SPA (SPLoPA) linear: validate, choose a backend, call the op."""

from __future__ import annotations

from torch import Tensor

from .. import ops
from .._block_validation import check_splopa_linear_args
from ..backend import resolve


def splopa_linear(
    x: Tensor,
    weight: Tensor,
    prototype_rows: Tensor,
    prototype_cols: Tensor,
    pos_weights: Tensor,
    bias: Tensor | None = None,
    block_mask: Tensor | None = None,
    *,
    scale: float = 1.0,
    backend: str | None = None,
) -> Tensor:
    r"""Block-pruned linear layer with a prototype adapter (SPLoPA), over the active blocks only.

    With prototypes :math:`\Pi_k = U_k V_k` (p × q, rank r) and position weights
    :math:`\Phi`, the adapter's block (i, j) is
    :math:`\Delta W_{ij} = \sum_k \Phi_{k,i,j} \Pi_k`, and

    .. math::
        y = x\,\big((W + s\,\Delta W) \odot (M \otimes 1_{p \times q})\big)^\top + b

    (the bias on every output).  Cost is proportional to the active blocks; no
    ``(K, out, in)`` or ``W + ΔW`` tensor is built.

    Args:
        x: ``(..., in)``.
        weight: ``(out, in)`` frozen base weight ``W``.
        prototype_rows: ``(K, r, q)``, the ``V_k`` (``adapter.prototypes.rows`` of sp_adapters).
        prototype_cols: ``(K, p, r)``, the ``U_k`` (``adapter.prototypes.cols``).
        pos_weights: ``(K, out/p, in/q)``, ``Φ`` (``adapter.pos_weights``).
        bias: ``(out,)`` or ``None``.
        block_mask: bool ``(out/p, in/q)``, ``M``; ``None`` means every block is active.
        scale: adapter scale ``s``.
        backend: ``None``/``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``(..., out)``.  Gradients: ``x``, ``W`` (zero at pruned blocks), ``U``, ``V``
        (summed over active blocks), ``Φ`` (zero at pruned blocks) and ``b``.
    """
    scale = check_splopa_linear_args(x, weight, prototype_rows, prototype_cols, pos_weights, bias, block_mask, scale)
    impl = resolve(backend, x.device, x.dtype, "splopa_linear")
    return ops.call(ops.splopa_linear, x, weight, prototype_rows, prototype_cols, pos_weights, bias, block_mask, scale,
                             impl.name)


def splopa_linear_trusted(
    x: Tensor,
    weight: Tensor,
    prototype_rows: Tensor,
    prototype_cols: Tensor,
    pos_weights: Tensor,
    bias: Tensor | None,
    block_mask: Tensor | None,
    scale: float,
    backend: str | None,
) -> Tensor:
    """``splopa_linear`` for modules, whose parameters are consistent by construction; checks ``x`` only."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but weight expects {weight.shape[1]}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x has dtype {x.dtype} but weight has {weight.dtype}")
    impl = resolve(backend, x.device, x.dtype, "splopa_linear")
    return ops.call(ops.splopa_linear, x, weight, prototype_rows, prototype_cols, pos_weights, bias, block_mask, float(scale),
                             impl.name)


__all__ = ["splopa_linear", "splopa_linear_trusted"]
