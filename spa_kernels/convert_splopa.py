"""Turn a model's linear layers into block-SPA modules (the counterpart of ``sp_adapters.SPLoPA``)."""

from __future__ import annotations

import copy
import logging

from torch import nn

from .nn.splopa import DEFAULT_INIT_RANGE, SPLoPALinear, SPLoPASharing, is_sp_adapters_splopa_linear

logger = logging.getLogger("spa_kernels")

# Modules whose forward reads their children's weights directly instead of calling them.
OPAQUE_TYPES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


def convert_splopa(
    model: nn.Module,
    num_prototypes: int = 64,
    block_shape: tuple[int, int] = (32, 32),
    prototype_rank: int | float = 1,
    shared_prototypes: bool = True,
    shared_pos_weights: bool = False,
    init_range: float | None = DEFAULT_INIT_RANGE,
    *,
    inplace: bool = False,
    scale: float = 1.0,
    backend: str | None = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` (exact type) and ``sp_adapters.SPLoPALinear`` of ``model`` by :class:`SPLoPALinear`.

    The weight is copied and frozen, the bias copied, and a fresh adapter added
    (sp_adapters layers keep theirs).  Sharing of prototypes (and position
    weights, with ``shared_pos_weights``) is scoped to this one model: layers of
    the returned model share with each other and never with another model.
    Left unchanged with a warning: layers whose shape ``block_shape`` does not
    divide, subclasses of ``nn.Linear`` and ``nn.MultiheadAttention``.  Existing
    ``SPLoPALinear`` layers are kept as they are.

    Returns the converted model (a deep copy unless ``inplace``); use the return
    value, since a model that is itself a linear layer is replaced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    sharing = SPLoPASharing()
    p, q = block_shape

    def replace(module: nn.Module, name: str) -> nn.Module:
        if isinstance(module, SPLoPALinear):
            return module
        if type(module) is nn.Linear or is_sp_adapters_splopa_linear(module):
            if type(module) is nn.Linear and (module.out_features % p or module.in_features % q):
                logger.warning("convert_splopa: '%s' left unchanged: (%d, %d) is not divisible by block_shape %s",
                               name, module.out_features, module.in_features, tuple(block_shape))
                return module
            return SPLoPALinear.from_module(
                module, num_prototypes, block_shape, prototype_rank, shared_prototypes, shared_pos_weights,
                init_range, scale=scale, backend=backend, sharing=sharing,
            )
        if isinstance(module, OPAQUE_TYPES) or isinstance(module, nn.Linear):
            logger.warning("convert_splopa: %s '%s' left unchanged (not supported)", type(module).__name__, name)
            return module
        for child_name, child in module.named_children():
            new_child = replace(child, f"{name}.{child_name}" if name else child_name)
            if new_child is not child:
                setattr(module, child_name, new_child)
        return module

    return replace(model, "")


__all__ = ["convert_splopa"]
