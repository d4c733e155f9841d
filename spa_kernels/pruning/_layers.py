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


__all__ = ["spa_layers"]
