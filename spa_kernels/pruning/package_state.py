"""Which tensors outside the SPA layers a task package stores, and which trained ones it would miss.

A task trains more than its adapters: norm layers' affine parameters and running
statistics, a head, and whatever else the user left trainable.  By default a package
stores, outside the SPA layers, the SPLoPA layers and the task-specific modules:

* every parameter that requires grad;
* every persistent buffer of a module that owns such a parameter, or of a norm layer
  (batch-norm running statistics change in training even when the affine is frozen).
"""

from __future__ import annotations

import warnings

from torch import Tensor, nn

from ..freeze import inside_any, is_norm
from ._layers import spa_layers
from .block_pruning import splopa_layers


def _adapted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The SPA and SPLoPA layers: their masks, adapters and biases have package entries of their own."""
    return spa_layers(model) | dict(splopa_layers(model))


def _direct_tensors(module: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    parameters = dict(module.named_parameters(recurse=False))
    persistent = {name: buffer for name, buffer in module.named_buffers(recurse=False)
                  if name not in module._non_persistent_buffers_set}
    return parameters, persistent


def trained_state_names(model: nn.Module, owned: list[str]) -> list[str]:
    """Qualified names of the parameters and buffers the package stores outside SPA layers and ``owned``."""
    outside = list(_adapted_layers(model)) + owned
    names: list[str] = []
    seen: set[int] = set()  # a tensor shared by two modules is stored once
    for module_name, module in model.named_modules():
        if inside_any(module_name, outside):
            continue
        parameters, buffers = _direct_tensors(module)
        trained = {key: value for key, value in parameters.items() if value.requires_grad}
        chosen = dict(trained)
        if trained or is_norm(module):
            chosen.update({key: value for key, value in buffers.items() if value is not None})
        for key, value in chosen.items():
            if id(value) not in seen:
                seen.add(id(value))
                names.append(f"{module_name}.{key}" if module_name else key)
    return names


def warn_about_left_out(model: nn.Module, owned: list[str], stored: list[str]) -> list[str]:
    """Warn naming every parameter that requires grad but that the package does not store; return them.

    An SPA or SPLoPA layer's package entry holds its masks, adapter and bias; a trainable
    ``weight`` (masked fine-tuning) or any other trainable tensor of the layer is left out.
    """
    layers = _adapted_layers(model)
    stored_set = set(stored)
    left_out = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or name in stored_set or inside_any(name, owned):
            continue
        owner = next((layer for layer in layers if inside_any(name, [layer])), None)
        if owner is not None and _stored_with_layer(name, owner, layers[owner]):
            continue
        left_out.append(name)
    if left_out:
        shown = ", ".join(left_out[:8]) + (f", … ({len(left_out) - 8} more)" if len(left_out) > 8 else "")
        warnings.warn(f"save_task: {len(left_out)} trainable tensors are not stored in the package and will "
                      f"not be restored by load_task: {shown}; name their modules in task_specific to keep "
                      "them", stacklevel=4)
    return left_out


def _stored_with_layer(name: str, layer_name: str, layer: nn.Module) -> bool:
    local = name[len(layer_name) + 1:] if layer_name else name
    return local == "bias" or local == "adapter" or local.startswith("adapter.")


__all__ = ["trained_state_names", "warn_about_left_out"]
