"""Turn a model's layers into SPA modules (the counterpart of ``sp_adapters.SPLoRA``).

Which layer becomes what is a lookup table keyed on the *exact* type of a layer:
subclasses of ``nn.Linear`` or ``nn.ConvNd`` may compute something else in
``forward`` (or, like ``nn.MultiheadAttention``'s ``out_proj``, not be called at
all), so replacing them could silently change the model.  New layer kinds are
added as table entries.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Callable

from torch import nn

from .nn import (
    ChannelMasked,
    SPLoRAConv1d,
    SPLoRAConv2d,
    SPLoRAConv3d,
    SPLoRALinear,
    SPLoRAMultiheadAttention,
    SPPaRAConv1d,
    SPPaRAConv2d,
    SPPaRAConv3d,
)

logger = logging.getLogger("spa_kernels")

# torch layer type -> SPA module type (whose ``from_module`` builds the replacement).
TORCH_REPLACEMENTS: dict[type[nn.Module], type[ChannelMasked]] = {
    nn.Linear: SPLoRALinear,
    nn.MultiheadAttention: SPLoRAMultiheadAttention,
}

# torch convolution type -> SPA module type, per ``conv_adapter``.
TORCH_CONV_REPLACEMENTS: dict[str, dict[type[nn.Module], type[ChannelMasked]]] = {
    "splora": {nn.Conv1d: SPLoRAConv1d, nn.Conv2d: SPLoRAConv2d, nn.Conv3d: SPLoRAConv3d},
    "sppara": {nn.Conv1d: SPPaRAConv1d, nn.Conv2d: SPPaRAConv2d, nn.Conv3d: SPPaRAConv3d},
}

# SPA module types with a full-rank adapter: no ``rank`` or ``scale`` to pass.
FULL_RANK_TYPES: tuple[type[ChannelMasked], ...] = (SPPaRAConv1d, SPPaRAConv2d, SPPaRAConv3d)

# sp_adapters class name -> SPA module type.  Looked up only when sp_adapters is
# already imported: a model cannot hold its layers otherwise.
# Each keeps its own kind of adapter, whatever ``conv_adapter`` says.
SP_ADAPTERS_REPLACEMENTS: dict[str, type[ChannelMasked]] = {
    "SPLoRALinear": SPLoRALinear,
    "SPLoRAMultiheadAttention": SPLoRAMultiheadAttention,
    "SPLoRAConv1d": SPLoRAConv1d,
    "SPLoRAConv2d": SPLoRAConv2d,
    "SPLoRAConv3d": SPLoRAConv3d,
    "SPPaRAConv1d": SPPaRAConv1d,
    "SPPaRAConv2d": SPPaRAConv2d,
    "SPPaRAConv3d": SPPaRAConv3d,
}

# Modules whose forward reads their children's weights directly instead of calling
# them; replacing those children would leave the adapter unused.
OPAQUE_TYPES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)

# Layer families of which only the exact types above are converted.
REPLACEABLE_FAMILIES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

CONV_ADAPTERS = tuple(TORCH_CONV_REPLACEMENTS)


def _replacement_for(module: nn.Module, conv_adapter: str) -> type[ChannelMasked] | None:
    replacement = TORCH_REPLACEMENTS.get(type(module)) or TORCH_CONV_REPLACEMENTS[conv_adapter].get(type(module))
    if replacement is not None:
        return replacement
    sp_adapters = sys.modules.get("sp_adapters")
    if sp_adapters is not None:
        for name, spa_type in SP_ADAPTERS_REPLACEMENTS.items():
            if type(module) is getattr(sp_adapters, name, None):
                return spa_type
    return None


def _has_even_kernel(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and any(k % 2 == 0 for k in module.kernel_size)


def _replace(
    module: nn.Module,
    name: str,
    conv_adapter: str,
    build: Callable[[nn.Module, type[ChannelMasked]], nn.Module],
) -> nn.Module:
    """``module`` with its supported layers replaced (children in place)."""
    if isinstance(module, ChannelMasked):
        return module  # already an SPA module: converting again would drop its adapter
    replacement = _replacement_for(module, conv_adapter)
    if replacement is not None:
        if _has_even_kernel(module):
            logger.warning("convert: '%s' (%s) left unchanged: kernel_size=%s is even, and the "
                           "adapter needs a centre tap", name, type(module).__name__, module.kernel_size)
            return module
        return build(module, replacement)
    if isinstance(module, OPAQUE_TYPES):
        logger.warning("convert: %s '%s' left unchanged (not supported)", type(module).__name__, name)
        return module
    if isinstance(module, REPLACEABLE_FAMILIES):
        logger.warning("convert: '%s' of type %s left unchanged: only exact nn.Linear and "
                       "nn.Conv1d/2d/3d layers are converted", name, type(module).__name__)
        return module
    for child_name, child in module.named_children():
        new_child = _replace(child, f"{name}.{child_name}" if name else child_name, conv_adapter, build)
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
    conv_adapter: str = "splora",
) -> nn.Module:
    """Replace every supported layer of ``model`` by its SPA module, recursively.

    ``nn.Linear`` becomes :class:`spa_kernels.nn.SPLoRALinear` and ``nn.Conv1d/2d/3d``
    become ``SPLoRAConv1d/2d/3d`` (or ``SPPaRAConv1d/2d/3d`` with
    ``conv_adapter="sppara"``) via ``from_module``: the weight is copied and frozen,
    the bias copied, and a fresh adapter added.  sp_adapters layers
    (``SPLoRALinear``, ``SPLoRAConvNd``, ``SPPaRAConvNd``) become the SPA module of
    the same kind and keep their own adapter and rank.  SPA modules are left as
    they are, so converting twice changes nothing.

    ``nn.MultiheadAttention`` becomes :class:`spa_kernels.nn.SPLoRAMultiheadAttention`.
    Left unchanged with a warning: subclasses of ``nn.MultiheadAttention``,
    ``nn.Linear``/``nn.ConvNd``, and convolutions with an even kernel size (the
    adapter sits on the kernel's centre tap).  Grouped and depthwise convolutions
    are converted; they run on the reference backend (warned about once), so they
    get ``backend=None`` whatever ``backend`` says.

    Args:
        model: the model; not modified unless ``inplace``.
        rank: adapter rank, or a float below 1 for a fraction of each layer's outputs.
        init_range: ``B`` starts uniform in ``±init_range``.
        inplace: convert ``model`` itself instead of a deep copy.
        scale: adapter scale ``s`` of every new layer.
        backend: kernel backend of every new layer (``None`` = auto).
        conv_adapter: ``"splora"`` (low-rank, ``rank`` and ``scale`` apply) or
            ``"sppara"`` (full-rank ``P``, ``init_range`` applies) for torch convolutions.

    Returns:
        The converted model.  Use the return value: when ``model`` itself is a
        supported layer it is replaced, not modified, even with ``inplace=True``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(conv_adapter, str) or conv_adapter not in CONV_ADAPTERS:
        raise ValueError(f"conv_adapter must be one of {CONV_ADAPTERS}, got {conv_adapter!r}")
    if not inplace:
        model = copy.deepcopy(model)

    def build(layer: nn.Module, spa_type: type[ChannelMasked]) -> nn.Module:
        layer_backend = backend
        if getattr(layer, "groups", 1) != 1 and backend not in (None, "auto", "reference"):
            logger.warning("convert: grouped convolution (groups=%d) gets backend=None instead of %r: "
                           "grouped convolutions run on the reference backend only", layer.groups, backend)
            layer_backend = None
        if issubclass(spa_type, FULL_RANK_TYPES):
            return spa_type.from_module(layer, init_range=init_range, backend=layer_backend)
        return spa_type.from_module(layer, rank=rank, init_range=init_range, scale=scale, backend=layer_backend)

    return _replace(model, "", conv_adapter, build)


__all__ = ["convert"]
