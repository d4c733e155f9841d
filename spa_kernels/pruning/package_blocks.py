"""What a task package stores for block-SPA (SPLoPA) layers, and how it is written.

A SPLoPA layer's task is its block mask ``M`` (out/p × in/q), its position weights
``Φ`` (K, out/p, in/q) and its bias; the prototypes ``U`` (K, p, r) and ``V``
(K, r, q) are shared by the layers of one converted model.  A package stores:

* per SPLoPA layer (section ``"block_layers"``): the block mask, bit-packed in
  row-major block order; ``Φ[:, M]`` (K values per active block, blocks in row-major
  order), unless the position weights are shared (below); and the whole bias (a block
  mask prunes no output, so every bias entry is live);
* per shared tensor set (section ``"shared"``), once however many layers hold it:
  each distinct pair of prototype tensors, and each position-weight tensor held by
  more than one layer (``shared_pos_weights=True``).  A shared ``Φ`` is stored whole:
  its entries serve several masks at once.  A record names the layers that hold it,
  and loading requires the model to share among exactly those layers, so one write
  reaches every sharer.

Sharing is found by tensor identity, as :class:`spa_kernels.nn.SPLoPASharing` sets it
up.  The stored values per task are what
:func:`spa_kernels.pruning.block_pruning.splopa_stored_parameters` counts; the masks
cost one bit per block on top.

This module only describes and writes; :mod:`.package_format` lays out the bytes and
:mod:`.package_staging` checks a package against a model before loading it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..nn import SPLoPALinear
from .block_pruning import splopa_layers

PROTOTYPES = "prototypes"
POS_WEIGHTS = "pos_weights"
SHARED_KINDS = (PROTOTYPES, POS_WEIGHTS)


def block_layers_in_scope(model: nn.Module, inside_owned: Callable[[str], bool]) -> dict[str, SPLoPALinear]:
    """The SPLoPA layers of ``model`` that a package stores as block layers (not inside a task-specific module)."""
    return {name: layer for name, layer in splopa_layers(model) if not inside_owned(name)}


def shared_tensors(layer: SPLoPALinear) -> dict[str, tuple[Tensor, ...]]:
    """The tensors a layer may share with others, by shared-set kind."""
    prototypes = layer.adapter.prototypes
    return {PROTOTYPES: (prototypes.rows, prototypes.cols), POS_WEIGHTS: (layer.adapter.pos_weights,)}


def sharing_groups(layers: dict[str, SPLoPALinear]) -> dict[str, list[list[str]]]:
    """For each shared kind, the names of the layers holding each distinct tensor set, first holder first.

    Prototypes form a set even when held by one layer (they are always stored once, in
    ``"shared"``); position weights only when held by several layers.
    """
    groups: dict[str, dict[tuple[int, ...], list[str]]] = {kind: {} for kind in SHARED_KINDS}
    for name, layer in layers.items():
        for kind, tensors in shared_tensors(layer).items():
            groups[kind].setdefault(tuple(id(tensor) for tensor in tensors), []).append(name)
    return {
        PROTOTYPES: list(groups[PROTOTYPES].values()),
        POS_WEIGHTS: [names for names in groups[POS_WEIGHTS].values() if len(names) > 1],
    }


def block_layer_description(name: str, layer: SPLoPALinear, pos_weights_shared: bool) -> dict:
    """The base model's facts about one SPLoPA layer that a package must agree with."""
    return {
        "name": name,
        "kind": type(layer).__name__,
        "weight_shape": list(layer.weight.shape),
        "block_shape": list(layer.block_shape),
        "num_prototypes": layer.num_prototypes,
        "rank": layer.prototype_rank,
        "scale": float(layer.scale),
        "bias": layer.bias is not None,
        "pos_weights": "shared" if pos_weights_shared else "own",
    }


def shared_pos_weight_names(groups: dict[str, list[list[str]]]) -> set[str]:
    return {name for names in groups[POS_WEIGHTS] for name in names}


def _block_layer_record(name: str, layer: SPLoPALinear, pos_weights_shared: bool, writer) -> dict:
    record = block_layer_description(name, layer, pos_weights_shared)
    mask = layer.block_mask.detach().cpu()
    rows, cols = mask.nonzero(as_tuple=True)
    record["active_blocks"] = rows.numel()
    tensors = {"block_mask": writer.bits(mask.flatten())}
    with torch.no_grad():
        if not pos_weights_shared:
            tensors["pos_weights"] = writer.tensor(layer.adapter.pos_weights.detach().cpu()[:, rows, cols])
        if layer.bias is not None:
            tensors["bias"] = writer.tensor(layer.bias.detach().cpu())
    record["tensors"] = tensors
    return record


def _shared_record(kind: str, names: list[str], layer: SPLoPALinear, writer) -> dict:
    if kind == PROTOTYPES:
        prototypes = layer.adapter.prototypes
        tensors = {"rows": writer.tensor(prototypes.rows.detach()), "cols": writer.tensor(prototypes.cols.detach())}
    else:
        tensors = {"value": writer.tensor(layer.adapter.pos_weights.detach())}
    return {"name": f"{names[0]}.adapter.{kind}", "kind": kind, "layers": list(names), "tensors": tensors}


def block_records(model: nn.Module, inside_owned: Callable[[str], bool], writer) -> tuple[list[dict], list[dict]]:
    """The ``"block_layers"`` and ``"shared"`` sections of ``model``'s package.

    ``writer`` appends tensors to the payload (``writer.tensor(t)``, ``writer.bits(mask)``)
    and returns their blob descriptions.
    """
    layers = block_layers_in_scope(model, inside_owned)
    groups = sharing_groups(layers)
    shared_pos = shared_pos_weight_names(groups)
    records = [_block_layer_record(name, layer, name in shared_pos, writer) for name, layer in layers.items()]
    shared = [_shared_record(kind, names, layers[names[0]], writer)
              for kind in SHARED_KINDS for names in groups[kind]]
    return records, shared


__all__ = [
    "POS_WEIGHTS",
    "PROTOTYPES",
    "SHARED_KINDS",
    "block_layer_description",
    "block_layers_in_scope",
    "block_records",
    "shared_pos_weight_names",
    "shared_tensors",
    "sharing_groups",
]
