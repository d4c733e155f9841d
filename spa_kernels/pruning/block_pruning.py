"""Block pruning of SPLoPA layers: block scores, one-shot and iterative schedules, accounting.

Scores (one value per p × q block, ``-inf`` where a block is already pruned):

* magnitude: the Frobenius norm of the adapted block ``W_ij + s ΔW_ij``;
* movement (Lagunas et al. 2021, after Sanh et al. 2020): ``-Σ W_eff ⊙ ∇W_eff``
  over the block, accumulated over training steps by :class:`BlockMovement`.

A schedule keeps the top-scoring fraction of blocks, either of each layer
(``scope="layer"``) or of all layers ranked together (``scope="global"``);
pruned blocks never come back.

Accounting: :func:`splopa_stored_parameters` counts what a task stores (the
position weights of active blocks, K per block; the bias; each distinct set of
prototypes once) and :func:`splopa_active_flops` the multiply-adds of the active
blocks (times two).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from ..nn.splopa import SPLoPALinear

SCOPES = ("global", "layer")


def splopa_layers(model: nn.Module) -> Iterator[tuple[str, SPLoPALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, SPLoPALinear):
            yield name, module


def _block_view(t: Tensor, layer: SPLoPALinear) -> Tensor:
    """An (out, in) tensor as (out/p, in/q, p, q) blocks."""
    p, q = layer.block_shape
    rows, cols = layer.block_mask.shape
    return t.reshape(rows, p, cols, q).permute(0, 2, 1, 3)


@torch.no_grad()
def adapted_blocks(layer: SPLoPALinear) -> Tensor:
    """``W + s ΔW`` as (out/p, in/q, p, q) blocks, every block (pruned ones too)."""
    prototypes = layer.adapter.prototypes
    pi = prototypes.cols @ prototypes.rows  # (K, p, q)
    delta = torch.einsum("kij,kpq->ijpq", layer.adapter.pos_weights, pi)
    return _block_view(layer.weight, layer) + layer.scale * delta


@torch.no_grad()
def magnitude_scores(layer: SPLoPALinear) -> Tensor:
    """Frobenius norm of each adapted block, ``-inf`` at pruned blocks: (out/p, in/q)."""
    scores = adapted_blocks(layer).flatten(2).norm(dim=2)
    return scores.masked_fill(~layer.block_mask, float("-inf"))


class BlockMovement:
    """Accumulates movement scores ``-Σ_block W_eff ⊙ ∇W_eff`` over training steps.

    While active (``with BlockMovement(model) as movement:``) every SPLoPA layer's
    weight requires grad, so the op computes the masked gradient of the adapted
    weight (``∇W_eff = ∇W``: W enters the effective weight with coefficient 1);
    call :meth:`accumulate` after each backward.  Weights are frozen again and
    their gradients dropped on exit.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = dict(splopa_layers(model))
        self.scores = {name: torch.zeros(layer.block_mask.shape, device=layer.weight.device)
                       for name, layer in self.layers.items()}
        self._previous: dict[str, bool] = {}

    def __enter__(self) -> BlockMovement:
        for name, layer in self.layers.items():
            self._previous[name] = layer.weight.requires_grad
            layer.weight.requires_grad_(True)
        return self

    def __exit__(self, *exc) -> None:
        for name, layer in self.layers.items():
            layer.weight.requires_grad_(self._previous.get(name, False))
            layer.weight.grad = None

    @torch.no_grad()
    def accumulate(self) -> None:
        """Add this step's movement and clear the weights' gradients."""
        for name, layer in self.layers.items():
            grad = layer.weight.grad
            if grad is None:
                continue
            movement = -(adapted_blocks(layer) * _block_view(grad, layer)).flatten(2).sum(2)
            self.scores[name] += movement.float()
            layer.weight.grad = None

    def __call__(self, name: str, layer: SPLoPALinear) -> Tensor:
        return self.scores[name].masked_fill(~layer.block_mask, float("-inf"))


def _magnitude(name: str, layer: SPLoPALinear) -> Tensor:
    return magnitude_scores(layer)


@torch.no_grad()
def prune_blocks(model: nn.Module, density: float, scores: Callable[[str, SPLoPALinear], Tensor] | None = None,
                 *, scope: str = "global", min_blocks: int = 1) -> dict[str, float]:
    """Keep the top ``density`` fraction of all blocks (scored by ``scores``, default magnitude).

    ``scope="layer"`` keeps that fraction of each layer; ``"global"`` ranks every
    block of every layer together (scores must then be comparable).  Each layer
    keeps at least ``min_blocks``.  Returns each layer's density after pruning.
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must lie in [0, 1], got {density}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    scores = scores if scores is not None else _magnitude
    layers = dict(splopa_layers(model))
    if not layers:
        raise ValueError("model has no SPLoPALinear layers (convert it with spa_kernels.convert_splopa)")
    by_layer = {name: scores(name, layer).float().flatten() for name, layer in layers.items()}
    chosen: dict[str, Tensor] = {}
    if scope == "global":
        flat = torch.cat([score.cpu() for score in by_layer.values()])
        selected = torch.zeros(flat.numel(), dtype=torch.bool)
        selected[flat.argsort(descending=True, stable=True)[:round(density * flat.numel())]] = True
        start = 0
        for name, score in by_layer.items():
            chosen[name] = selected[start:start + score.numel()]
            start += score.numel()
    for name, layer in layers.items():
        score = by_layer[name].cpu()
        active = layer.block_mask.flatten().cpu()
        order = score.argsort(descending=True, stable=True)
        if scope == "layer":
            mask = torch.zeros_like(active)
            mask[order[:round(density * score.numel())]] = True
        else:
            mask = chosen[name].clone()
        mask &= active
        floor = min(min_blocks, int(active.sum()))
        if int(mask.sum()) < floor:  # each layer keeps its best min_blocks active blocks
            best = order[active[order]][:floor]
            mask[best] = True
        layer.set_masks(mask.view_as(layer.block_mask).to(layer.block_mask.device))
    return {name: float(layer.block_mask.float().mean()) for name, layer in layers.items()}


def iterative_block_prune(model: nn.Module, density: float, steps: int,
                          scores: Callable[[str, SPLoPALinear], Tensor] | None = None, *, scope: str = "global",
                          fine_tune: Callable[[nn.Module], None] | None = None) -> list[float]:
    """Prune to ``density`` in ``steps`` geometric steps, calling ``fine_tune(model)`` after each.

    ``scores`` is called afresh at every step (a :class:`BlockMovement` can be reset
    or kept accumulating inside ``fine_tune``).  Returns the density of each step.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must lie in (0, 1], got {density}")
    schedule = [density ** ((step + 1) / steps) for step in range(steps)]
    for target in schedule:
        prune_blocks(model, target, scores, scope=scope)
        if fine_tune is not None:
            fine_tune(model)
    return schedule


def splopa_stored_parameters(model: nn.Module) -> int:
    """Values a task stores: K position weights per active block and the biases of every layer,
    plus each distinct set of prototypes once (layers of one model share them).

    Position weights shared by several layers (``shared_pos_weights=True``) serve several
    masks at once, so they count whole, once."""
    layers = list(splopa_layers(model))
    holders: dict[int, int] = {}
    for _, layer in layers:
        holders[id(layer.adapter.pos_weights)] = holders.get(id(layer.adapter.pos_weights), 0) + 1
    total = 0
    seen: set[int] = set()
    for _, layer in layers:
        pos_weights = layer.adapter.pos_weights
        if holders[id(pos_weights)] == 1:
            total += layer.num_prototypes * int(layer.block_mask.sum())
        elif id(pos_weights) not in seen:
            seen.add(id(pos_weights))
            total += pos_weights.numel()
        if layer.bias is not None:
            total += layer.bias.numel()
        prototypes = layer.adapter.prototypes
        if id(prototypes) not in seen:
            seen.add(id(prototypes))
            total += prototypes.rows.numel() + prototypes.cols.numel()
    return total


def splopa_active_flops(model: nn.Module, tokens: int) -> int:
    """Floating-point operations of the SPLoPA layers' active blocks for ``tokens`` input rows: 2·tokens·p·q per block."""
    flops = 0
    for _, layer in splopa_layers(model):
        p, q = layer.block_shape
        flops += 2 * tokens * p * q * int(layer.block_mask.sum())
    return flops


__all__ = [
    "BlockMovement",
    "adapted_blocks",
    "iterative_block_prune",
    "magnitude_scores",
    "prune_blocks",
    "splopa_active_flops",
    "splopa_layers",
    "splopa_stored_parameters",
]
