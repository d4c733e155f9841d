"""Turn a model's layers into SPA modules (the counterpart of ``sp_adapters.SPLoRA``).

Which layer becomes what is a lookup table keyed on the *exact* type of a layer:
subclasses of ``nn.Linear`` may compute something else in ``forward`` (or, like
``nn.MultiheadAttention``'s ``out_proj``, not be called at all), so replacing them
could silently change the model.  New layer kinds are added as table entries.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Callable

from torch import nn

from .nn import ChannelMasked, SPLoRALinear

logger = logging.getLogger("spa_kernels")

# torch layer type -> SPA module type (whose ``from_module`` builds the replacement).
TORCH_REPLACEMENTS: dict[type[nn.Module], type[ChannelMasked]] = {
    nn.Linear: SPLoRALinear,
}

# sp_adapters class name -> SPA module type.  Looked up only when sp_adapters is
# already imported: a model cannot hold its layers otherwise.
SP_ADAPTERS_REPLACEMENTS: dict[str, type[ChannelMasked]] = {
    "SPLoRALinear": SPLoRALinear,
}

# Modules whose forward reads their children's weights directly instead of calling
# them; replacing those children would leave the adapter unused.
OPAQUE_TYPES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


def _replacement_for(module: nn.Module) -> type[ChannelMasked] | None:
    replacement = TORCH_REPLACEMENTS.get(type(module))
    if replacement is not None:
        return replacement
    sp_adapters = sys.modules.get("sp_adapters")
    if sp_adapters is not None:
        for name, spa_type in SP_ADAPTERS_REPLACEMENTS.items():
            if type(module) is getattr(sp_adapters, name, None):
                return spa_type
    return None


def _replace(module: nn.Module, name: str, build: Callable[[nn.Module, type[ChannelMasked]], nn.Module]) -> nn.Module:
    """``module`` with its supported layers replaced (children in place)."""
    if isinstance(module, ChannelMasked):
        return module  # already an SPA module: converting again would drop its adapter
    replacement = _replacement_for(module)
    if replacement is not None:
        return build(module, replacement)
    if isinstance(module, OPAQUE_TYPES):
        logger.warning("convert: %s '%s' left unchanged (not supported)", type(module).__name__, name)
        return module
    if isinstance(module, nn.Linear):
        logger.warning("convert: '%s' of type %s left unchanged: only exact nn.Linear layers are "
                       "converted", name, type(module).__name__)
        return module
    for child_name, child in module.named_children():
        new_child = _replace(child, f"{name}.{child_name}" if name else child_name, build)
        if new_child is not child:
            setattr(module, child_name, new_child)
    return module


def convert(
    model: nn.Module,
    rank: int | float = 16,
    init_range: float | None = 1e-4,
    inplace: bool = False,
    scale: float = 1.0,
    backend: str | None = None,
) -> nn.Module:
    """Replace every supported layer of ``model`` by its SPA module, recursively.

    ``nn.Linear`` and ``sp_adapters.SPLoRALinear`` become
    :class:`spa_kernels.nn.SPLoRALinear` via ``from_module``: the weight is copied and
    frozen, the bias copied, and a fresh rank-``rank`` adapter added (an
    sp_adapters layer keeps its own adapter and rank).  SPA modules are left as
    they are, so converting twice changes nothing.  ``nn.MultiheadAttention`` and
    subclasses of ``nn.Linear`` are left unchanged with a warning.

    Args:
        model: the model; not modified unless ``inplace``.
        rank: adapter rank, or a float below 1 for a fraction of each layer's outputs.
        init_range: ``B`` starts uniform in ``±init_range``.
        inplace: convert ``model`` itself instead of a deep copy.
        scale: adapter scale ``s`` of every new layer.
        backend: kernel backend of every new layer (``None`` = auto).

    Returns:
        The converted model.  Use the return value: when ``model`` itself is a
        supported layer it is replaced, not modified, even with ``inplace=True``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)

    def build(layer: nn.Module, spa_type: type[ChannelMasked]) -> nn.Module:
        return spa_type.from_module(layer, rank=rank, init_range=init_range, scale=scale, backend=backend)

    return _replace(model, "", build)


__all__ = ["convert"]
