"""Which parameters of a converted model train: the freeze policy ``convert`` applies.

A converted model is a frozen base plus a few trainable tensors per task.  By
default those are, and nothing else:

* the adapters of the SPA layers (every parameter of an SPA layer but its ``weight``
  and ``bias``; ``convert`` already froze the ``weight``);
* the biases of the SPA layers, and the attention's ``in_proj_bias`` (``train_bias="converted"``);
* the affine parameters of normalisation layers (``train_norms=True``);
* the parameters of the modules excluded from conversion (the new task's head).

Everything else of the base (embeddings, class tokens, position embeddings, layers
that were not converted, an unconverted ``nn.MultiheadAttention``) is frozen.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

from .nn import ChannelMasked, SPLoRAMultiheadAttention

# torch's normalisation layers; models define their own (RMSNorm, T5LayerNorm…), recognised by name.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm1d/2d/3d
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
NORM_NAME_SUFFIXES = ("Norm", "Norm1d", "Norm2d", "Norm3d")

TRAIN_BIAS_CHOICES = ("none", "converted", "all")


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer (a torch one, or a class whose name ends in ``Norm``)."""
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith(NORM_NAME_SUFFIXES)


def is_spa_layer(module: nn.Module) -> bool:
    """Whether ``module`` is an SPA layer: a frozen ``weight`` plus an adapter of its own."""
    return isinstance(module, ChannelMasked)


# Converted modules whose biases are parameters of their own rather than of a child SPA
# layer (the attention's q/k/v bias is one ``in_proj_bias``, as in torch and sp_adapters).
CONVERTED_BIASES: dict[type[nn.Module], tuple[str, ...]] = {
    SPLoRAMultiheadAttention: ("in_proj_bias", "bias_k", "bias_v"),
}


def is_converted_bias(module: nn.Module, local_name: str) -> bool:
    """Whether ``module.<local_name>`` is the bias of a converted layer."""
    if local_name == "bias" and is_spa_layer(module):
        return True
    return any(isinstance(module, kind) and local_name in names for kind, names in CONVERTED_BIASES.items())


def inside_any(name: str, outers: Iterable[str]) -> bool:
    return any(outer == "" or name == outer or name.startswith(outer + ".") for outer in outers)


def check_train_bias(train_bias: object) -> str:
    if train_bias is True:
        return "converted"
    if train_bias is False:
        return "none"
    if not isinstance(train_bias, str) or train_bias not in TRAIN_BIAS_CHOICES:
        raise ValueError(f"train_bias must be one of {TRAIN_BIAS_CHOICES} (or a bool), got {train_bias!r}")
    return train_bias


def freeze(
    model: nn.Module,
    *,
    excluded: Iterable[str] = (),
    train_bias: str | bool = "converted",
    train_norms: bool = True,
    trainable: Iterable[str] = (),
) -> None:
    """Set ``requires_grad`` of every parameter of ``model`` by the policy above, in place.

    Args:
        model: a converted model.
        excluded: qualified names of modules that keep every parameter trainable.
        train_bias: ``"converted"`` (biases of SPA layers train), ``"all"`` (every bias
            of the model trains), ``"none"`` (no bias trains; an SPA layer's bias too
            is frozen).  ``True``/``False`` mean ``"converted"``/``"none"``.
        train_norms: whether the affine parameters of normalisation layers train.
        trainable: ``fnmatch`` patterns of qualified parameter names that train
            whatever the rules above say (e.g. ``"embeddings.*"``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    train_bias = check_train_bias(train_bias)
    excluded, patterns = list(excluded), _check_patterns(trainable)
    spa_names = [name for name, module in model.named_modules() if is_spa_layer(module)]
    for module_name, module in model.named_modules():
        if module_name not in spa_names and inside_any(module_name, spa_names):
            continue  # an SPA layer's adapter module: its parameters are the adapter
        for local_name, parameter in module.named_parameters(recurse=False):
            name = f"{module_name}.{local_name}" if module_name else local_name
            wanted = _trains(module_name, module, local_name, excluded, train_bias, train_norms)
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
                wanted = True
            if wanted is not None:
                parameter.requires_grad_(wanted and (parameter.is_floating_point() or parameter.is_complex()))


def _trains(module_name: str, module: nn.Module, local_name: str, excluded: list[str],
            train_bias: str, train_norms: bool) -> bool | None:
    """Whether a parameter trains; ``None`` leaves it as it is (an SPA layer's adapter and weight)."""
    if inside_any(module_name, excluded):
        return True
    if local_name == "bias" and train_bias == "all":
        return True
    if is_converted_bias(module, local_name):
        return train_bias in ("converted", "all")
    if is_spa_layer(module):
        return None
    if is_norm(module):
        return train_norms
    return False


def _check_patterns(trainable: Iterable[str]) -> list[str]:
    if isinstance(trainable, str):
        trainable = (trainable,)
    patterns = list(trainable)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"trainable must hold parameter-name patterns (str), got {type(pattern).__name__}")
    return patterns


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """``{qualified name: element count}`` of every parameter of ``model`` that requires grad."""
    return {name: parameter.numel() for name, parameter in model.named_parameters() if parameter.requires_grad}


__all__ = ["freeze", "is_norm", "is_spa_layer", "trainable_parameters"]
