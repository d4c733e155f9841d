"""The SPA layers of a model, by qualified name: what every pruning tool walks."""

from __future__ import annotations

from torch import nn

from ..nn import ChannelMasked


def spa_layers(model: nn.Module) -> dict[str, ChannelMasked]:
    """Every SPA module of ``model`` (``model`` itself included), keyed by qualified name.

    The order is ``named_modules`` order, so it is stable across calls and between
    two models of the same architecture.
    """
    return {name: module for name, module in model.named_modules() if isinstance(module, ChannelMasked)}


def checked_spa_layers(model: nn.Module, purpose: str) -> dict[str, ChannelMasked]:
    """:func:`spa_layers` of ``model``, which must be a module with at least one SPA layer.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: it has no SPA layer (``purpose`` says what they were wanted for).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = spa_layers(model)
    if not layers:
        raise ValueError(f"model has no SPA layers to {purpose}; convert it first with spa_kernels.convert")
    return layers


__all__ = ["checked_spa_layers", "spa_layers"]
