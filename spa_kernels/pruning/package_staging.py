"""Staging a parsed task package against a model: every check before the first write.

:func:`stage` turns a package's header and payload into a :class:`Plan` of
writes on the model's device and dtype, or raises ``ValueError`` naming what
does not fit; ``load_task`` applies the plan only once it is complete, so a bad
package leaves the model unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..nn import ChannelMasked, SPLoPALinear
from ._layers import spa_layers
from .package_blocks import (
    SHARED_KINDS,
    block_layer_description,
    block_layers_in_scope,
    shared_pos_weight_names,
    shared_tensors,
    sharing_groups,
)
from .package_format import (
    DTYPES,
    FIRST_BLOCK_VERSION,
    Malformed,
    decode_bits,
    decode_tensor,
    expect,
    inside,
    layer_description,
    metadata_modules,
    selects_columns,
)


@dataclass
class _Write:
    """``target`` becomes zero except at ``rows`` × ``columns`` (``None``: all), which take ``value``."""

    target: Tensor
    value: Tensor  # on the target's device, in its dtype
    rows: Tensor | None
    columns: Tensor | None

    def apply(self) -> None:
        if self.rows is None and self.columns is None:
            self.target.copy_(self.value)
            return
        self.target.zero_()
        if self.rows is None:
            self.target.index_copy_(1, self.columns, self.value)
        elif self.columns is None:
            self.target.index_copy_(0, self.rows, self.value)
        else:
            self.target[self.rows.unsqueeze(1), self.columns] = self.value


@dataclass
class _StagedLayer:
    """Masks and stored entries of one SPA layer, checked and ready to be written."""

    layer: ChannelMasked
    in_mask: Tensor
    out_mask: Tensor
    writes: list[_Write]

    def apply(self) -> None:
        self.layer.set_masks(self.in_mask, self.out_mask)
        for write in self.writes:
            write.apply()


@dataclass
class _StagedBlockLayer:
    """Block mask, active position weights and bias of one SPLoPA layer, checked and ready to be written."""

    layer: SPLoPALinear
    block_mask: Tensor
    active_rows: Tensor
    active_cols: Tensor
    pos_weights: Tensor | None  # (K, active blocks); None when the position weights are shared
    bias: Tensor | None

    def apply(self) -> None:
        self.layer.set_masks(self.block_mask)
        if self.pos_weights is not None:
            target = self.layer.adapter.pos_weights
            target.zero_()
            target[:, self.active_rows, self.active_cols] = self.pos_weights
        if self.bias is not None:
            self.layer.bias.copy_(self.bias)


@dataclass
class Plan:
    layers: list[_StagedLayer]
    blocks: list[_StagedBlockLayer]
    shared: list[_Write]  # whole tensors held by several SPLoPA layers, written once
    modules: list[tuple[nn.Module, dict[str, Tensor]]]
    metadata: dict[str, dict[str, int]]
    state: list[tuple[Tensor, Tensor]]  # (target in the model, value on its device and dtype)


def stage(model: nn.Module, header: dict, data: bytearray, start: int, where: str) -> Plan:
    try:
        return _stage_checked(model, header, data, start)
    except Malformed as error:
        raise ValueError(f"task package {where} does not fit the model: {error}") from None


def _check_names(kind: str, in_package: list[str], in_model: list[str]) -> None:
    missing = [name for name in in_package if name not in in_model]
    extra = [name for name in in_model if name not in in_package]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"the model lacks {missing[:4]}" + (" …" if len(missing) > 4 else ""))
        if extra:
            parts.append(f"the package lacks {extra[:4]}" + (" …" if len(extra) > 4 else ""))
        raise Malformed(f"its {kind} differ from the model's ({'; '.join(parts)}): another architecture?")


def _stage_checked(model: nn.Module, header: dict, data: bytearray, start: int) -> Plan:
    owned = [record["name"] for record in header["modules"]]
    owned_modules = {}
    for name in owned:
        try:
            owned_modules[name] = model.get_submodule(name)
        except AttributeError:
            raise Malformed(f"the model has no module {name!r}, which the package holds as task-specific") from None

    def inside_owned(name: str) -> bool:
        return any(inside(name, outer) for outer in owned)

    model_layers = {name: layer for name, layer in spa_layers(model).items() if not inside_owned(name)}
    _check_names("SPA layers", [record["name"] for record in header["layers"]], list(model_layers))
    blocks, shared = [], []
    # Packages older than block layers stored a SPLoPA layer's tensors whole in "state".
    if header["format_version"] >= FIRST_BLOCK_VERSION:
        blocks, shared = _stage_blocks(block_layers_in_scope(model, inside_owned), header, data, start)
    model_metadata = metadata_modules(model)
    _check_names("modules with task metadata", list(header["metadata"]), list(model_metadata))
    for name in header["metadata"]:
        expect(callable(getattr(model_metadata[name], "load_task_metadata", None)),
                f"module {name!r} defines task_metadata but not load_task_metadata")
    layers = [_stage_layer(model_layers[record["name"]], record, data, start) for record in header["layers"]]
    modules = [_stage_module(owned_modules[record["name"]], record, data, start) for record in header["modules"]]
    return Plan(layers, blocks, shared, modules, header["metadata"], _stage_state(model, header["state"], data, start))


def _stage_state(model: nn.Module, records: list[dict], data: bytearray, start: int) -> list[tuple[Tensor, Tensor]]:
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    staged = []
    for record in records:
        name = record["name"]
        expect(name in tensors, f"the model has no parameter or buffer {name!r}, which the package stores")
        blob = record["tensors"].get("value")
        expect(blob is not None and set(record["tensors"]) == {"value"},
               f"state entry {name!r} holds tensors {sorted(record['tensors'])}, expected ['value']")
        target, dtype = tensors[name], DTYPES[blob["dtype"]] if blob["dtype"] in DTYPES else None
        expect(dtype is not None, f"{name!r}: dtype {blob['dtype']} is not a tensor dtype")
        expect(tuple(blob["shape"]) == tuple(target.shape),
               f"{name!r}: shape {blob['shape']} in the package, {list(target.shape)} in the model")
        expect(dtype == target.dtype or (dtype.is_floating_point and target.dtype.is_floating_point),
               f"{name!r}: dtype {blob['dtype']} in the package, {target.dtype} in the model")
        staged.append((target, decode_tensor(data, start, blob).to(device=target.device, dtype=target.dtype)))
    return staged


def _stage_layer(layer: ChannelMasked, record: dict, data: bytearray, start: int) -> _StagedLayer:
    name = record["name"]
    description = layer_description(name, layer)
    for key, value in description.items():
        expect(record.get(key) == value,
                f"layer {name!r}: {key} is {record.get(key)!r} in the package, {value!r} in the model")
    tensors = record["tensors"]
    in_mask = decode_bits(data, start, tensors["in_mask"], f"layer {name!r} in_mask")
    out_mask = decode_bits(data, start, tensors["out_mask"], f"layer {name!r} out_mask")
    expect(in_mask.size == description["in"] and out_mask.size == description["out"],
            f"layer {name!r}: mask lengths {in_mask.size}, {out_mask.size} for "
            f"{description['in']} inputs, {description['out']} outputs")
    in_idx, out_idx = np.flatnonzero(in_mask), np.flatnonzero(out_mask)
    expect(record["active_in"] == in_idx.size and record["active_out"] == out_idx.size,
            f"layer {name!r}: active counts disagree with its masks")

    device = layer.weight.device
    on_device: dict[str, Tensor] = {}

    def index(which: str, positions: np.ndarray) -> Tensor:
        if which not in on_device:
            on_device[which] = torch.from_numpy(positions).to(device)
        return on_device[which]

    # key -> (target, expected stored shape, rows, columns) with rows/columns as ("in"|"out", indices) or None
    columns = selects_columns(description)
    plan: dict[str, tuple[Tensor, tuple[int, ...], tuple | None, tuple | None]] = {}
    if description["adapter"] == "low-rank":
        rows, cols = layer.adapter.rows[0], layer.adapter.cols[0]  # A (r × in), B (out × r)
        plan["adapter.rows"] = (rows, (rows.shape[0], in_idx.size if columns else rows.shape[1]),
                                None, ("in", in_idx) if columns else None)
        plan["adapter.cols"] = (cols, (out_idx.size, cols.shape[1]), ("out", out_idx), None)
    elif description["adapter"] == "full":
        adapter = layer.adapter
        plan["adapter"] = (adapter, (out_idx.size, in_idx.size if columns else adapter.shape[1]),
                           ("out", out_idx), ("in", in_idx) if columns else None)
    if layer.bias is not None:
        plan["bias"] = (layer.bias, (out_idx.size,), ("out", out_idx), None)
    wanted = set(plan) | {"in_mask", "out_mask"}
    expect(set(tensors) == wanted, f"layer {name!r} holds tensors {sorted(tensors)}, expected {sorted(wanted)}")

    writes = []
    for key, (target, shape, rows_at, columns_at) in plan.items():
        blob = tensors[key]
        expect(tuple(blob["shape"]) == shape, f"layer {name!r} {key}: shape {blob['shape']} in the package, "
                                               f"{list(shape)} expected from its masks and the model")
        expect(blob["dtype"] in DTYPES and DTYPES[blob["dtype"]].is_floating_point,
                f"layer {name!r} {key}: dtype {blob['dtype']} is not a float dtype")
        value = decode_tensor(data, start, blob).to(device=target.device, dtype=target.dtype)
        writes.append(_Write(target, value,
                             None if rows_at is None else index(*rows_at),
                             None if columns_at is None else index(*columns_at)))
    return _StagedLayer(layer, torch.from_numpy(in_mask), torch.from_numpy(out_mask), writes)


def _stage_module(module: nn.Module, record: dict, data: bytearray, start: int) -> tuple[nn.Module, dict[str, Tensor]]:
    name = record["name"]
    expect(record.get("kind") == type(module).__name__,
            f"task-specific module {name!r} is a {record.get('kind')} in the package, "
            f"a {type(module).__name__} in the model")
    current = module.state_dict()
    tensors = record["tensors"]
    _check_names(f"state-dict keys of {name!r}", list(tensors), list(current))
    state = {}
    for key, blob in tensors.items():
        target = current[key]
        expect(blob["dtype"] in DTYPES, f"{name!r} {key}: dtype {blob['dtype']} is not a tensor dtype")
        dtype = DTYPES[blob["dtype"]]
        expect(tuple(blob["shape"]) == tuple(target.shape),
                f"{name!r} {key}: shape {blob['shape']} in the package, {list(target.shape)} in the model")
        expect(dtype == target.dtype or (dtype.is_floating_point and target.dtype.is_floating_point),
                f"{name!r} {key}: dtype {blob['dtype']} in the package, {target.dtype} in the model")
        state[key] = decode_tensor(data, start, blob).to(device=target.device, dtype=target.dtype)
    return module, state


# --------------------------------------------------------------------------- block-SPA layers


def _stage_blocks(model_blocks: dict[str, SPLoPALinear], header: dict, data: bytearray,
                  start: int) -> tuple[list[_StagedBlockLayer], list[_Write]]:
    _check_names("SPLoPA layers", [record["name"] for record in header["block_layers"]], list(model_blocks))
    groups = sharing_groups(model_blocks)
    for kind in SHARED_KINDS:
        in_package = [sorted(record["layers"]) for record in header["shared"] if record["kind"] == kind]
        in_model = [sorted(names) for names in groups[kind]]
        expect(sorted(in_package) == sorted(in_model),
               f"its {kind} are shared among the layers {sorted(in_package)}, the model's among {sorted(in_model)}")
    shared_pos = shared_pos_weight_names(groups)
    blocks = [_stage_block_layer(model_blocks[record["name"]], record, record["name"] in shared_pos, data, start)
              for record in header["block_layers"]]
    shared = [write for record in header["shared"]
              for write in _stage_shared(model_blocks[record["layers"][0]], record, data, start)]
    return blocks, shared


def _float_value(blob: dict, target: Tensor, shape: tuple[int, ...], what: str, data: bytearray,
                 start: int) -> Tensor:
    expect(tuple(blob["shape"]) == shape, f"{what}: shape {blob['shape']} in the package, {list(shape)} expected "
                                          "from the model")
    expect(blob["dtype"] in DTYPES and DTYPES[blob["dtype"]].is_floating_point,
           f"{what}: dtype {blob['dtype']} is not a float dtype")
    return decode_tensor(data, start, blob).to(device=target.device, dtype=target.dtype)


def _stage_block_layer(layer: SPLoPALinear, record: dict, pos_weights_shared: bool, data: bytearray,
                       start: int) -> _StagedBlockLayer:
    name = record["name"]
    description = block_layer_description(name, layer, pos_weights_shared)
    for key, value in description.items():
        expect(record.get(key) == value,
               f"block layer {name!r}: {key} is {record.get(key)!r} in the package, {value!r} in the model")
    tensors = record["tensors"]
    grid = tuple(layer.block_mask.shape)
    bits = decode_bits(data, start, tensors["block_mask"], f"block layer {name!r} block_mask")
    expect(bits.size == grid[0] * grid[1],
           f"block layer {name!r}: block_mask holds {bits.size} blocks, the model's grid {grid} has {grid[0] * grid[1]}")
    mask = bits.reshape(grid)
    rows, cols = np.nonzero(mask)
    expect(record["active_blocks"] == rows.size, f"block layer {name!r}: active block count disagrees with its mask")
    wanted = {"block_mask"} | ({"pos_weights"} if not pos_weights_shared else set()) | (
        {"bias"} if layer.bias is not None else set())
    expect(set(tensors) == wanted, f"block layer {name!r} holds tensors {sorted(tensors)}, expected {sorted(wanted)}")
    pos_weights = bias = None
    if not pos_weights_shared:
        target = layer.adapter.pos_weights
        pos_weights = _float_value(tensors["pos_weights"], target, (target.shape[0], rows.size),
                                   f"block layer {name!r} pos_weights", data, start)
    if layer.bias is not None:
        bias = _float_value(tensors["bias"], layer.bias, tuple(layer.bias.shape), f"block layer {name!r} bias",
                            data, start)
    device = layer.block_mask.device
    return _StagedBlockLayer(layer, torch.from_numpy(mask).to(device), torch.from_numpy(rows).to(device),
                             torch.from_numpy(cols).to(device), pos_weights, bias)


def _stage_shared(holder: SPLoPALinear, record: dict, data: bytearray, start: int) -> list[_Write]:
    kind, tensors = record["kind"], record["tensors"]
    keys = ("rows", "cols") if kind == "prototypes" else ("value",)
    expect(set(tensors) == set(keys),
           f"shared {kind} {record['name']!r} holds tensors {sorted(tensors)}, expected {sorted(keys)}")
    writes = []
    for key, target in zip(keys, shared_tensors(holder)[kind], strict=True):
        value = _float_value(tensors[key], target, tuple(target.shape), f"shared {kind} {record['name']!r} {key}",
                             data, start)
        writes.append(_Write(target, value, None, None))
    return writes
