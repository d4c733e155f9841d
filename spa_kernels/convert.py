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
from collections.abc import Callable, Iterable

from torch import nn

from ._weight_reads import children_read_directly
from .conversion_report import ConversionReport, conversion_report
from .exclusion import excluded_names, set_aside
from .freeze import freeze as apply_freeze
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
from .nn.transformer import holds_spa_layer, use_composed_forward

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


def _owners_of_parameters(model: nn.Module) -> dict[int, dict[int, str]]:
    """``id(parameter)`` -> ``{id(module): name}`` of every module holding it directly."""
    owners: dict[int, dict[int, str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), {}).setdefault(id(module), module_name)
    return owners


def _tied_owner(module: nn.Module, owners: dict[int, dict[int, str]]) -> str | None:
    """Name of another module holding one of ``module``'s parameters (weight tying), if any."""
    for parameter in module.parameters(recurse=False):
        others = [name for owner, name in owners.get(id(parameter), {}).items() if owner != id(module)]
        if others:
            return others[0]
    return None


def _replace(
    module: nn.Module,
    name: str,
    conv_adapter: str,
    build: Callable[[nn.Module, type[ChannelMasked]], nn.Module],
    owners: dict[int, dict[int, str]],
    converted: dict[int, nn.Module],
) -> nn.Module:
    """``module`` with its supported layers replaced (children in place).

    ``converted`` maps a layer already replaced to its replacement, so a layer that
    appears twice in the model stays one shared layer.
    """
    if id(module) in converted:
        return converted[id(module)]
    if isinstance(module, ChannelMasked):
        return module  # already an SPA module: converting again would drop its adapter
    if isinstance(module, OPAQUE_TYPES) and holds_spa_layer(module):
        # Its forward (and a replacement built from it) reads the projections' weights
        # directly, so an SPA layer placed inside would lose its adapter and masks.
        raise ValueError(
            f"convert: '{name}' ({type(module).__name__}) holds an SPA layer, but its forward reads its "
            "projection weights directly, so the adapter and masks would be skipped")
    replacement = _replacement_for(module, conv_adapter)
    if replacement is not None:
        if _has_even_kernel(module):
            logger.warning("convert: '%s' (%s) left unchanged: kernel_size=%s is even, and the "
                           "adapter needs a centre tap", name, type(module).__name__, module.kernel_size)
            return module
        tied_to = _tied_owner(module, owners)
        if tied_to is not None:
            # The other holder would keep reading the plain weight while this layer
            # adds its adapter; keeping the tie and the plain layer is the safe choice.
            logger.warning("convert: '%s' (%s) left unchanged: its parameters are shared with '%s' "
                           "(weight tying), which would bypass the adapter", name, type(module).__name__, tied_to)
            return module
        converted[id(module)] = build(module, replacement)
        return converted[id(module)]
    if isinstance(module, OPAQUE_TYPES):
        logger.warning("convert: %s '%s' left unchanged (not supported)", type(module).__name__, name)
        return module
    if isinstance(module, REPLACEABLE_FAMILIES):
        logger.warning("convert: '%s' of type %s left unchanged: only exact nn.Linear and "
                       "nn.Conv1d/2d/3d layers are converted", name, type(module).__name__)
        return module
    read_directly = children_read_directly(module)
    # named_children() lists a module held twice only once; every place must be replaced.
    for child_name, child in list(module._modules.items()):
        if child is None:
            continue
        child_path = f"{name}.{child_name}" if name else child_name
        if child_name in read_directly and isinstance(child, ChannelMasked):
            raise ValueError(
                f"convert: '{child_path}' ({type(child).__name__}) is an SPA layer, but {type(module).__name__} "
                f"reads its parameters directly (`{read_directly[child_name]}`), so the adapter and masks "
                "would be skipped")
        if child_name in read_directly and _replacement_for(child, conv_adapter) is not None:
            logger.warning("convert: '%s' (%s) left unchanged: %s reads its parameters directly "
                           "(`%s`), which would bypass the adapter", child_path, type(child).__name__,
                           type(module).__name__, read_directly[child_name])
            continue
        new_child = _replace(child, child_path, conv_adapter, build, owners, converted)
        if new_child is not child:
            setattr(module, child_name, new_child)
    # Containers whose fast path reads their children's weights must call them instead.
    use_composed_forward(module, name)
    return module


def convert(
    model: nn.Module,
    rank: int | float = 16,
    init_range: float | None = 1e-4,
    inplace: bool = False,
    scale: float = 1.0,
    backend: str | None = None,
    conv_adapter: str = "splora",
    *,
    exclude: Iterable[str | type[nn.Module]] | str | type[nn.Module] = (),
    freeze: bool = True,
    train_bias: str | bool = "converted",
    train_norms: bool = True,
    trainable: Iterable[str] = (),
    report: bool = False,
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Replace every supported layer of ``model`` by its SPA module, recursively.

    ``nn.Linear`` becomes :class:`spa_kernels.nn.SPLoRALinear` and ``nn.Conv1d/2d/3d``
    become ``SPLoRAConv1d/2d/3d`` (or ``SPPaRAConv1d/2d/3d`` with
    ``conv_adapter="sppara"``) via ``from_module``: the weight is copied and frozen,
    the bias copied, and a fresh adapter added.  sp_adapters layers
    (``SPLoRALinear``, ``SPLoRAConvNd``, ``SPPaRAConvNd``) become the SPA module of
    the same kind and keep their own adapter and rank.  SPA modules are left as
    they are, so converting twice changes nothing.

    ``nn.MultiheadAttention`` becomes :class:`spa_kernels.nn.SPLoRAMultiheadAttention`.
    Left unchanged with a warning: subclasses of ``nn.MultiheadAttention``, subclasses of
    ``nn.Linear``/``nn.ConvNd``, convolutions with an even kernel size (the
    adapter sits on the kernel's centre tap), layers whose parameters another
    module shares (weight tying: that module would read the weight without the
    adapter), and layers whose parent's code reads their weight itself instead of
    calling them (found in the parent class's source).  A layer that appears twice
    in the model becomes one shared SPA layer.  ``nn.TransformerEncoderLayer`` and
    ``nn.TransformerEncoder`` holding a converted layer become
    :class:`spa_kernels.nn.ComposedTransformerEncoderLayer` / ``...Encoder``, whose
    forward calls the layers in every mode (PyTorch's inference fast path would read
    their weights directly); ``docs/bypasses.md`` lists every such path.  Grouped and
    depthwise convolutions are converted; they run on the reference backend (warned
    about once), so they get ``backend=None`` whatever ``backend`` says.

    Args:
        model: the model; not modified unless ``inplace``.
        rank: adapter rank, or a float below 1 for a fraction of each layer's outputs.
        init_range: ``B`` starts uniform in ``±init_range``.
        inplace: convert ``model`` itself instead of a deep copy.
        scale: adapter scale ``s`` of every new layer.
        backend: kernel backend of every new layer (``None`` = auto).
        conv_adapter: ``"splora"`` (low-rank, ``rank`` and ``scale`` apply) or
            ``"sppara"`` (full-rank ``P``, ``init_range`` applies) for torch convolutions.
        exclude: modules to leave exactly as they are, and trainable in full (the new
            task's head): qualified module names of ``model``, ``fnmatch`` patterns of
            them (``"encoder.layer.*.output"``), or module types (every instance).
        freeze: apply the freeze policy (:func:`spa_kernels.freeze.freeze`): after
            conversion only the adapters, the biases of converted layers, the norm
            layers' affine parameters and the excluded modules train; everything else
            (embeddings, class and position tokens, unconverted layers) is frozen.
            ``False`` leaves every ``requires_grad`` as it was, except the converted
            layers' frozen weights.
        train_bias: ``"converted"`` (the converted layers' biases train), ``"all"``
            (every bias trains), ``"none"`` (no bias trains, outside excluded modules).
        train_norms: whether the norm layers' affine parameters train.
        trainable: ``fnmatch`` patterns of parameter names that train regardless
            (``"embeddings.*"``, ``"*.cls_token"``).
        report: also return the :class:`~spa_kernels.conversion_report.ConversionReport`
            (which is logged at INFO either way).

    Raises:
        TypeError: a subclass of a torch transformer container with a fused fast
            path holds a converted layer.
        ValueError: an ``nn.MultiheadAttention``, or a module whose code reads a child's
            weight itself, holds an SPA layer there.

    Returns:
        The converted model, or ``(model, report)`` with ``report=True``.  Use the
        return value: when ``model`` itself is a supported layer it is replaced, not
        modified, even with ``inplace=True``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(conv_adapter, str) or conv_adapter not in CONV_ADAPTERS:
        raise ValueError(f"conv_adapter must be one of {CONV_ADAPTERS}, got {conv_adapter!r}")
    excluded = excluded_names(model, exclude)
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

    if "" in excluded:
        converted = model
    else:
        with set_aside(model, excluded):
            converted = _replace(model, "", conv_adapter, build, _owners_of_parameters(model), {})
    if freeze:
        apply_freeze(converted, excluded=excluded, train_bias=train_bias, train_norms=train_norms,
                     trainable=trainable)
    summary = conversion_report(converted, excluded=excluded, left_alone_reason=left_alone_reason)
    logger.info("convert: %s", summary)
    return (converted, summary) if report else converted


def left_alone_reason(module: nn.Module) -> str | None:
    """Why ``convert`` leaves a layer of a convertible family alone; ``None`` for other modules."""
    if isinstance(module, OPAQUE_TYPES):
        return "not supported: its forward reads its projections' weights directly"
    if _replacement_for(module, CONV_ADAPTERS[0]) is not None:
        return "even kernel size: the adapter needs a centre tap" if _has_even_kernel(module) else None
    if isinstance(module, REPLACEABLE_FAMILIES):
        return f"{type(module).__name__} is a subclass: only exact nn.Linear and nn.Conv1d/2d/3d are converted"
    return None


__all__ = ["convert"]
