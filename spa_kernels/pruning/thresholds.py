"""Pruning at one threshold: per-layer shares of a global threshold, layer costs, the keep rule.

The building blocks of :mod:`spa_kernels.pruning.adaptive` (whose docstring explains
the method and the choices made): :func:`layer_thresholds` splits ``T`` over the
layers as ``T_l = T · P_l / Σ_j P_j``, :func:`spa_layer_costs` gives the ``P_l``,
:func:`normalise_scores` and :func:`threshold_keep` decide which channels stay, and
:func:`prune_at_threshold` does one whole round on a model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..nn import ChannelMasked, SPLoRALinear
from ._layers import spa_layers
from .accounting import active_macs_by_layer

WEIGHTINGS = ("parameters", "flops")
NORMALISATIONS = ("mean", "max", "none")


# --------------------------------------------------------------------------- thresholds


def check_number(value: Any, name: str, *, minimum: float | None = None, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
    return value


def layer_thresholds(threshold: float, costs: Mapping[str, float]) -> dict[str, float]:
    """The per-layer thresholds ``T_l = T · P_l / Σ_j P_j``.

    Args:
        threshold: the global threshold ``T`` (>= 0).
        costs: ``P_l`` per layer (or channel group), >= 0, not all zero.

    Raises:
        TypeError: ``threshold`` or a cost is not a real number, ``costs`` not a mapping.
        ValueError: ``threshold`` negative or not finite, ``costs`` empty, a cost
            negative or not finite, or every cost zero.
    """
    threshold = check_number(threshold, "threshold", minimum=0.0)
    if not isinstance(costs, Mapping):
        raise TypeError(f"costs must be a mapping of name to P_l, got {type(costs).__name__}")
    if not costs:
        raise ValueError("costs must not be empty")
    checked = {name: check_number(cost, f"costs[{name!r}]", minimum=0.0) for name, cost in costs.items()}
    total = sum(checked.values())
    if total <= 0:
        raise ValueError("costs must not all be zero (Σ P_l is the denominator of T_l)")
    return {name: threshold * cost / total for name, cost in checked.items()}


def normalise_scores(scores: Tensor, active: Tensor, how: str = "max") -> Tensor:
    """``scores`` divided by their maximum (``how="max"``) or mean over the ``active`` channels; float64.

    ``how="none"`` returns the scores unchanged (as float64).  A layer whose active
    scores are all zero (or that has no active channel) is returned unscaled: there is
    nothing to tell its channels apart by.

    Raises:
        TypeError: ``scores`` not a floating tensor, ``active`` not a bool tensor.
        ValueError: not 1-D, lengths differ, ``how`` unknown, a score negative or not finite.
    """
    if how not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {how!r}")
    if not isinstance(scores, Tensor) or not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got {type(scores).__name__}")
    if not isinstance(active, Tensor) or active.dtype != torch.bool:
        raise TypeError("active must be a bool tensor")
    if scores.dim() != 1 or active.shape != scores.shape:
        raise ValueError(
            f"scores and active must be 1-D of one length, got {tuple(scores.shape)} and {tuple(active.shape)}"
        )
    scores = scores.detach().to("cpu", torch.float64)
    active = active.to("cpu")
    if not torch.isfinite(scores).all() or (scores < 0).any():
        raise ValueError("scores must be finite and >= 0 (attention maps are means of |a|^p)")
    if how == "none" or not active.any():
        return scores
    reference = scores[active].mean() if how == "mean" else scores[active].max()
    return scores if reference <= 0 else scores / reference


def threshold_keep(scores: Tensor, active: Tensor, layer_threshold: float, min_channels: int = 1) -> Tensor:
    """Which channels survive ``layer_threshold``: bool, True = keep.

    A channel is kept if it is active and its score is not below ``layer_threshold``.
    If fewer than ``min_channels`` survive, the best-scoring active channels are kept
    instead (ties to the lower index), up to ``min_channels`` or every active channel.
    An inactive channel is never brought back.

    Raises:
        TypeError / ValueError: as :func:`normalise_scores`; ``layer_threshold`` not a
            finite number; ``min_channels`` not an int >= 0.
    """
    normalise_scores(scores, active, "none")  # validates both tensors
    layer_threshold = check_number(layer_threshold, "layer_threshold")
    if isinstance(min_channels, bool) or not isinstance(min_channels, int):
        raise TypeError(f"min_channels must be an int, got {type(min_channels).__name__}")
    if min_channels < 0:
        raise ValueError(f"min_channels must be >= 0, got {min_channels}")
    scores = scores.detach().to("cpu", torch.float64)
    active = active.to("cpu")
    keep = active & (scores >= layer_threshold)
    wanted = min(min_channels, int(active.sum()))
    if int(keep.sum()) < wanted:
        ranked = torch.where(active, scores, torch.full_like(scores, -math.inf))
        # stable sort, descending: equal scores keep index order
        order = torch.sort(ranked, descending=True, stable=True).indices[:wanted]
        keep = torch.zeros_like(active)
        keep[order] = True
    return keep


# --------------------------------------------------------------------------- layer costs


def _kernel_taps(layer: ChannelMasked) -> int:
    return 1 if isinstance(layer, SPLoRALinear) else math.prod(layer.kernel_size)


def _active_weights(layer: ChannelMasked) -> int:
    """``|O|·|S|·k``: the base weights the masked layer computes with.

    In a grouped convolution an output reads only its group's inputs, so ``|O|·|S|``
    is the number of active (output, input) pairs ``Σ_g |O_g|·|S_g|``.
    """
    groups = getattr(layer, "groups", 1)
    out_per_group = layer.out_mask.detach().cpu().view(groups, -1).sum(dim=1)
    in_per_group = layer.in_mask.detach().cpu().view(groups, -1).sum(dim=1)
    return int((out_per_group * in_per_group).sum()) * _kernel_taps(layer)


def spa_layer_costs(model: nn.Module, weighting: str = "parameters", example_inputs: Any = None) -> dict[str, float]:
    """``P_l`` of every SPA layer of ``model`` under its current masks.

    ``weighting="parameters"``: ``|O|·|S|·k``.  ``weighting="flops"``: that times the
    layer's output positions in one forward of ``example_inputs`` (the
    multiply-accumulates of the base weights,
    :func:`~spa_kernels.pruning.accounting.active_macs_by_layer` with ``merged=True``);
    ``example_inputs`` is a tensor, a tuple/list of positional or a dict of keyword
    arguments.  Only ratios of these costs matter, so the batch size does not.

    Raises:
        TypeError: ``model`` not an ``nn.Module``.
        ValueError: unknown ``weighting``; no SPA layers; ``weighting="flops"``
            without ``example_inputs``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    layers = spa_layers(model)
    if not layers:
        raise ValueError("model has no SPA layers; convert it first with spa_kernels.convert")
    costs = {name: float(_active_weights(layer)) for name, layer in layers.items()}
    if weighting == "flops":
        if example_inputs is None:
            raise ValueError('weighting="flops" needs example_inputs to measure output sizes')
        costs = {name: float(macs) for name, macs in active_macs_by_layer(model, example_inputs, merged=True).items()}
    return costs


# --------------------------------------------------------------------------- pruning at T


def prune_at_threshold(
    model: nn.Module,
    groups: Sequence[Any],
    scores: Mapping[str, Tensor],
    threshold: float,
    *,
    weighting: str = "parameters",
    example_inputs: Any = None,
    normalise: str = "max",
    min_channels: int = 1,
) -> dict[str, int]:
    """Prune every channel group whose normalised score falls below its ``T_g``.

    ``T_g = T · P_g / Σ P`` with ``P_g`` the sum of :func:`spa_layer_costs` over the
    group's producers (see the module docstring for every choice).  ``groups`` are
    :class:`~spa_kernels.pruning.groups.ChannelGroup` objects (``size``,
    ``producers``, ``score(scores)``, ``kept(model)``, ``apply(model, keep)``); the
    costs are taken before this call prunes anything.  ``scores`` maps SPA-layer
    names to per-output-channel scores (higher = more important), as the criteria
    return them.  Returns the number of channels each group keeps, keyed by the
    group's first producer.

    Raises:
        TypeError / ValueError: bad ``threshold``, ``weighting``, ``normalise``,
            ``min_channels``, empty ``groups``, or a group whose producers are not SPA
            layers of ``model``.
    """
    threshold = check_number(threshold, "threshold", minimum=0.0)
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Iterable):
        raise TypeError("groups must be a sequence of channel groups")
    groups = list(groups)
    if not groups:
        raise ValueError("groups must not be empty")
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a mapping of layer name to tensor, got {type(scores).__name__}")
    costs = spa_layer_costs(model, weighting, example_inputs)
    layers = spa_layers(model)
    keys, group_costs = [], {}
    for group in groups:
        unknown = [name for name in group.producers if name not in layers]
        if not group.producers or unknown:
            raise ValueError(f"group producers {list(group.producers)} are not all SPA layers of model")
        key = group.producers[0]
        keys.append(key)
        group_costs[key] = sum(costs[name] for name in group.producers)
    thresholds = layer_thresholds(threshold, group_costs)
    kept = {}
    for key, group in zip(keys, groups, strict=True):
        active = group.kept(model).to("cpu")
        if active.dtype != torch.bool or active.shape != (group.size,):
            raise ValueError(f"group.kept(model) must be a bool tensor of the group size {group.size}")
        normalised = normalise_scores(group.score(scores).to(torch.float64), active, normalise)
        keep = threshold_keep(normalised, active, thresholds[key], min_channels)
        if not torch.equal(keep, active):
            group.apply(model, keep)
        kept[key] = int(keep.sum())
    return kept


__all__ = [
    "check_number",
    "layer_thresholds",
    "normalise_scores",
    "prune_at_threshold",
    "spa_layer_costs",
    "threshold_keep",
]
