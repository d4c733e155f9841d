"""Coupled channel groups: the channels that must be pruned together, and keeping them zero.

A channel cannot be pruned in one layer alone when other layers share it: the two
operands of a residual addition, a convolution and the batch norm after it, the
producers whose outputs a concatenation or a flatten hands to the next layer.  A
:class:`ChannelGroup` is one such set of tied channels: the SPA layers that write
them (*producers*), the SPA layers that read them (*consumers*, with the index
mapping of a flatten or a concatenation) and the norm layers in between.  Pruning
a group channel prunes it in every member at once (:meth:`ChannelGroup.apply`).

**Finding the groups.**  torch-pruning's dependency graph traces autograd and
knows which torch operations tie channels; it does not know the SPA modules,
whose forward runs custom operators.  So :func:`channel_groups` lets it trace a
*shadow* of the model: a CPU float32 copy in which every SPA layer is replaced by
a torch layer of the same kind and shape (zero weights: only the graph matters)
and every other module is copied as it is; module names are kept.  The frozen
base weights are never copied.  Attention layers' q/k/v/out channels are grouped
by head instead (:mod:`spa_kernels.pruning.heads`, :class:`AttentionGroup`).

The search for a group starts only at an SPA layer that is not an attention q/k/v
projection.  Starting at a plain layer or a projection gains nothing (a group holding
a layer the masks cannot reach, or a projection's output, is left out anyway), and a
start at a projection lets torch-pruning follow the attention core, where its index mapping (built for channels on dimension 1) walks
rotary embeddings' slice, negate and concatenate of the head dimension round a cycle,
shifting the indices each time, and never stops (Llama, Mistral, Qwen2).  A search
from the residual stream or an MLP reaches a projection's input channels only, never
its output: so it stays out of the core too.

**Not prunable.**  A group is left out when its channels reach a model output
(the classifier's classes), when it holds a layer the masks cannot reach (a
torch convolution or linear that was not converted, an embedding, attention,
an LSTM, a loose parameter, a grouped convolution that is not depthwise), or
when it holds a layer named in ``ignored_layers``.  Operations torch-pruning does
not know are taken to act channel by channel (its default).  The first layer's input
channels (the image channels) belong to no group: no layer writes them.

**Exact zeros.**  A pruned SPA output channel is exactly 0, but a norm layer maps
0 to ``beta - mean·gamma/sqrt(var + eps)``.  Consumers ignore pruned inputs
anyway, yet a channel that is not exactly zero leaks into anything that is not
an SPA layer (a feature output, a plain torch layer, a residual stream read
outside the groups).  The frozen base is shared across tasks, so
:func:`install_norm_masks` (called by :meth:`ChannelGroup.apply`) puts a forward hook
on every norm of a group that multiplies its output (out of place) by the producers'
``out_mask``, read from the producer's buffer (what a task package stores) and cached
until that buffer changes.  Group and instance norms still include the zeroed channels
in their statistics: exact zeros, not the numbers of a physically smaller network.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from ..nn import ChannelMasked, SPLoRAMultiheadAttention
from ._layers import spa_layers
from .heads import AttentionBlock, activate_heads, attention_blocks, attention_projections
from .norm_masks import NormChannelMask, install_norm_masks, remove_norm_masks

logger = logging.getLogger("spa_kernels")

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm,
)
"""Norm layers whose output channels a group zeroes with a hook (they hold no mask)."""


@dataclass(eq=False, frozen=True)
class ChannelMap:
    """Where a group's channels sit in one layer.

    Group channel ``group_index[k]`` is layer channel ``layer_index[k]``.  A
    concatenation shifts the layer index by an offset; a flatten after a convolution
    maps one group channel onto several consecutive linear inputs.
    ``channels`` is the layer's channel count on that side (output channels of a
    producer, input channels of a consumer, channels of a norm).
    """

    group_index: Tensor
    layer_index: Tensor
    channels: int

    def layer_mask(self, keep: Tensor, current: Tensor) -> Tensor:
        """``current`` with the mapped layer channels set from the group's ``keep``.

        A layer channel that several group channels map onto is kept if any of
        them is; channels outside the map keep their current value.
        """
        kept = torch.zeros(self.channels, dtype=torch.int8)
        kept.scatter_reduce_(0, self.layer_index, keep[self.group_index].to(torch.int8), "amax")
        covered = torch.zeros(self.channels, dtype=torch.bool)
        covered[self.layer_index] = True
        return torch.where(covered, kept.bool(), current.cpu())

    def group_lookup(self, size: int) -> Tensor:
        """For each group channel, one layer channel carrying it (-1 where none does)."""
        lookup = torch.full((size,), -1, dtype=torch.int64)
        lookup[self.group_index] = self.layer_index
        return lookup


@dataclass(eq=False)
class ChannelGroup:
    """One set of coupled channels: ``size`` channels pruned together in every member.

    ``out_maps`` holds the producers (SPA layers whose output channels carry the
    group), ``in_maps`` the consumers (SPA layers whose input channels read it) and
    ``norm_maps`` the norm layers on the way, each keyed by qualified module name
    in ``named_modules`` order.  A depthwise convolution is producer and consumer.
    """

    size: int
    out_maps: dict[str, ChannelMap]
    in_maps: dict[str, ChannelMap]
    norm_maps: dict[str, ChannelMap] = field(default_factory=dict)

    @property
    def producers(self) -> list[str]:
        """Names of the SPA layers whose output channels are tied in this group."""
        return list(self.out_maps)

    @property
    def consumers(self) -> list[str]:
        """Names of the SPA layers whose input channels read this group."""
        return list(self.in_maps)

    @property
    def norms(self) -> list[str]:
        """Names of the norm layers (batch, group, instance, layer norm) on this group's channels."""
        return list(self.norm_maps)

    def __repr__(self) -> str:
        return (f"ChannelGroup(size={self.size}, producers={self.producers}, consumers={self.consumers}, "
                f"norms={self.norms})")

    def score(self, scores: Mapping[str, Tensor]) -> Tensor:
        """One float32 score per group channel: the mean of its producers' output-channel scores.

        The mean (not the sum) keeps groups with many producers (a residual stream)
        comparable with groups of one, so a global ranking is not biased towards
        wide couplings.

        Raises:
            ValueError: a producer has no entry in ``scores``, or its entry is not
                1-D of the layer's output-channel count, or holds NaN.
            TypeError: an entry is not a tensor.
        """
        total = torch.zeros(self.size, dtype=torch.float64)
        count = torch.zeros(self.size, dtype=torch.float64)
        for name, channel_map in self.out_maps.items():
            if name not in scores:
                raise ValueError(f"scores has no entry for producer {name!r} of {self!r}")
            values = scores[name]
            if not isinstance(values, Tensor):
                raise TypeError(f"scores[{name!r}] must be a tensor, got {type(values).__name__}")
            if values.dim() != 1 or values.numel() != channel_map.channels:
                raise ValueError(f"scores[{name!r}] must be 1-D with one entry per output channel "
                                 f"({channel_map.channels}), got shape {tuple(values.shape)}")
            values = values.detach().to("cpu", torch.float64)
            if torch.isnan(values).any():
                raise ValueError(f"scores[{name!r}] contains NaN")
            total.index_add_(0, channel_map.group_index, values[channel_map.layer_index])
            count.index_add_(0, channel_map.group_index, torch.ones(channel_map.group_index.numel(),
                                                                    dtype=torch.float64))
        return (total / count).float()

    def kept(self, model: nn.Module) -> Tensor:
        """Bool ``(size,)``: the group channels that every producer of ``model`` still keeps."""
        layers = self._layers(model)
        kept = torch.ones(self.size, dtype=torch.bool)
        for name, channel_map in self.out_maps.items():
            active = layers[name].out_mask.detach().cpu()[channel_map.layer_index].to(torch.int8)
            per_channel = torch.ones(self.size, dtype=torch.int8)
            per_channel.scatter_reduce_(0, channel_map.group_index, active, "amin")
            kept &= per_channel.bool()
        return kept

    def apply(self, model: nn.Module, keep: Tensor) -> None:
        """Keep exactly the group channels where ``keep`` is True, in every member of ``model``.

        Sets each producer's ``out_mask`` and each consumer's ``in_mask`` at the
        mapped channels (through ``set_masks``; other channels of those layers are
        left alone), then installs the norm hooks of this group
        (:func:`install_norm_masks`; idempotent).  Masks may grow as well as shrink
        here: never reviving a channel is the schedule's rule, not this method's.

        Raises:
            TypeError: ``keep`` is not a bool tensor.
            ValueError: ``keep`` is not 1-D of ``size``, or ``model`` lacks a member.
        """
        if not isinstance(keep, Tensor) or keep.dtype != torch.bool:
            raise TypeError(f"keep must be a bool tensor, got "
                            f"{keep.dtype if isinstance(keep, Tensor) else type(keep).__name__}")
        if keep.dim() != 1 or keep.numel() != self.size:
            raise ValueError(f"keep must be 1-D of the group size {self.size}, got shape {tuple(keep.shape)}")
        keep = keep.cpu()
        layers = self._layers(model)
        new_masks: dict[str, dict[str, Tensor]] = defaultdict(dict)
        for name, channel_map in self.out_maps.items():
            new_masks[name]["out_mask"] = channel_map.layer_mask(keep, layers[name].out_mask)
        for name, channel_map in self.in_maps.items():
            new_masks[name]["in_mask"] = channel_map.layer_mask(keep, layers[name].in_mask)
        for name, masks in new_masks.items():
            layers[name].set_masks(**masks)
        install_norm_masks(model, [self])

    def _layers(self, model: nn.Module) -> dict[str, ChannelMasked]:
        """The SPA layers of ``model``, checked to match this group's members."""
        layers = spa_layers(model)
        for side, maps in (("out_mask", self.out_maps), ("in_mask", self.in_maps)):
            for name, channel_map in maps.items():
                layer = layers.get(name)
                if layer is None:
                    raise ValueError(f"model has no SPA layer named {name!r}; was this group found on "
                                     "another model?")
                if getattr(layer, side).numel() != channel_map.channels:
                    raise ValueError(f"SPA layer {name!r} has {getattr(layer, side).numel()} channels in its "
                                     f"{side}, the group expects {channel_map.channels}")
        return layers


@dataclass(eq=False)
class AttentionGroup(ChannelGroup):
    """Channels of one attention layer: whole heads, or channels inside heads (see ``heads``)."""
    block: AttentionBlock | None = None
    whole_heads: bool = True

    def __post_init__(self) -> None:  # heads.py gives maps as tuples: it cannot import this module
        for maps in (self.out_maps, self.in_maps):
            maps.update((name, ChannelMap(*m)) for name, m in maps.items() if isinstance(m, tuple))

    def apply(self, model: nn.Module, keep: Tensor) -> None:  # then the attention core skips pruned heads
        super().apply(model, keep)
        activate_heads(model, self.block, keep.cpu() if self.whole_heads else None)


# --------------------------------------------------------------------------------------------------
# Finding the groups with torch-pruning on a shadow model.


def channel_groups(
    model: nn.Module,
    example_inputs: Tensor | Sequence | Mapping,
    ignored_layers: Iterable[str | nn.Module] | None = None,
    whole_heads: bool = True,
) -> list[ChannelGroup]:
    """The prunable coupled channel groups of ``model``, ordered by their first producer.

    Args:
        model: a model holding SPA layers (after :func:`spa_kernels.convert`); not
            modified.
        example_inputs: one forward's inputs: a tensor (one positional input), a
            tuple or list (positional inputs) or a dict (keyword inputs).  Tensors
            are copied to the CPU in float32; a batch of one or two small samples
            is enough.
        ignored_layers: names or modules of ``model`` whose output channels must not
            be pruned (a container stands for every module inside it).  Their input
            channels may still be pruned by the groups that feed them.
        whole_heads: one group per attention head (per key/value head under grouped-query
            attention); False: channels inside heads, q tied to k and v to out (:mod:`.heads`).

    Returns:
        One :class:`ChannelGroup` per set of tied channels that can be pruned (see
        the module doc for what is left out).

    Raises:
        TypeError: ``model`` is not a module, or ``example_inputs`` is none of the above.
        ValueError: an ignored layer is not in ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inputs = _cpu_inputs(example_inputs)
    ignored_names = _ignored_names(model, ignored_layers)
    import torch_pruning as tp

    layers = spa_layers(model)
    shadow = _shadow(model, layers)
    ignored = [module for name in ignored_names for module in shadow.get_submodule(name).modules()]
    # torch-pruning starts no search at these, and drops the groups whose outputs they write
    # (the module doc says why: a search from an attention projection may never end).
    shadow_modules = dict(shadow.named_modules())
    ignored += [module for name, module in shadow_modules.items()
                if isinstance(module, (nn.Linear, _ConvNd)) and name not in layers]
    ignored += [shadow_modules[name] for name in attention_projections(model) if name in shadow_modules]
    outputs: list = []

    def keep_outputs(out):
        outputs.append(out)
        return out

    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(
            shadow, example_inputs=inputs, forward_fn=_run, output_transform=keep_outputs, verbose=False,
        )
    output_grad_fns = {o.grad_fn for o in tp.utils.flatten_as_list(outputs) if isinstance(o, Tensor)} - {None}
    names = {module: name for name, module in shadow.named_modules()}
    groups = []
    for tp_group in graph.get_all_groups(ignored_layers=ignored):
        group, reason = _group_from(tp_group, graph, names, layers, output_grad_fns, tp.ops.OPTYPE)
        if group is None:
            logger.debug("channels of %s not prunable: %s", names.get(tp_group[0].dep.target.module), reason)
        else:
            groups.append(group)
    blocks = attention_blocks(model, skip=ignored_names)
    claimed = {(n, "out") for b in blocks for n in (b.q, b.k, b.v)} | {(b.out, "in") for b in blocks}
    groups = [g for g in groups if claimed.isdisjoint([(n, "out") for n in g.producers] + [(n, "in") for n in g.consumers])]
    groups += [AttentionGroup(size, outs, ins, block=block, whole_heads=whole_heads)
               for block in blocks for size, outs, ins in block.channel_maps(whole_heads)]
    order = {name: position for position, name in enumerate(layers)}
    groups.sort(key=lambda group: min(order[name] for name in group.producers))
    return groups


def _run(model: nn.Module, inputs):
    if isinstance(inputs, Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


def _cpu_inputs(inputs):
    if isinstance(inputs, Tensor):
        return inputs.detach().to("cpu", torch.float32) if inputs.is_floating_point() else inputs.cpu()
    if isinstance(inputs, Mapping):
        return {key: _cpu_inputs(value) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_cpu_inputs(value) for value in inputs)
    raise TypeError(f"example_inputs must be a tensor, a tuple or list, or a dict, "
                    f"got {type(inputs).__name__}")


def _ignored_names(model: nn.Module, ignored_layers) -> list[str]:
    if ignored_layers is None:
        return []
    if isinstance(ignored_layers, (str, nn.Module)):
        ignored_layers = [ignored_layers]
    by_module = {module: name for name, module in model.named_modules()}
    known = set(by_module.values())
    names = []
    for layer in ignored_layers:
        if isinstance(layer, str):
            if layer not in known:
                raise ValueError(f"ignored_layers names {layer!r}, which is not a module of model")
            names.append(layer)
        elif isinstance(layer, nn.Module):
            if layer not in by_module:
                raise ValueError(f"ignored_layers holds a {type(layer).__name__} that is not a module "
                                 "of model")
            names.append(by_module[layer])
        else:
            raise TypeError(f"ignored_layers must hold module names or modules, got {type(layer).__name__}")
    return names


def _shadow(model: nn.Module, layers: dict[str, ChannelMasked]) -> nn.Module:
    """A CPU float32 copy of ``model`` with every SPA layer replaced by a zero torch layer of its shape."""
    memo: dict[int, object] = {id(layer): _plain_layer(layer) for layer in layers.values()}
    # Attention stands in the shadow as the torch layer it replaces, so its channels are
    # traced (and left out) exactly as for an unconverted model.
    memo.update((id(module), _plain_attention(module)) for module in model.modules()
                if isinstance(module, SPLoRAMultiheadAttention))
    for module in model.modules():
        if isinstance(module, (ChannelMasked, SPLoRAMultiheadAttention)):
            continue
        for parameter in module.parameters(recurse=False):
            memo.setdefault(id(parameter), nn.Parameter(_cpu_copy(parameter),
                                                        requires_grad=parameter.is_floating_point()))
        for buffer in module.buffers(recurse=False):
            memo.setdefault(id(buffer), _cpu_copy(buffer))
    shadow = copy.deepcopy(model, memo)
    remove_norm_masks(shadow)  # they read SPA masks the shadow does not have
    return shadow


def _cpu_copy(tensor: Tensor) -> Tensor:
    dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
    return tensor.detach().to("cpu", dtype, copy=True)


def _plain_layer(layer: ChannelMasked) -> nn.Module:
    if isinstance(layer, nn.Linear):
        plain: nn.Module = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None,
                                     device="meta")
    elif isinstance(layer, _ConvNd):
        conv_type = next(t for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(layer, t))
        plain = conv_type(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                          layer.padding, layer.dilation, layer.groups, layer.bias is not None,
                          layer.padding_mode, device="meta")
    else:
        raise TypeError(f"no torch counterpart known for the SPA layer {type(layer).__name__}")
    plain = plain.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in plain.parameters():
            parameter.zero_()
    return plain.train(layer.training)


def _plain_attention(attention: SPLoRAMultiheadAttention) -> nn.Module:
    plain = nn.MultiheadAttention(
        attention.embed_dim, attention.num_heads, attention.dropout, attention.in_proj_bias is not None,
        attention.bias_k is not None, attention.add_zero_attn, attention.kdim, attention.vdim,
        attention.batch_first, device="meta",
    ).to_empty(device="cpu")
    with torch.no_grad():
        for parameter in plain.parameters():
            parameter.zero_()
    return plain.train(attention.training)


def _group_from(tp_group, graph, names, layers, output_grad_fns, optype):
    """A :class:`ChannelGroup` from a torch-pruning group, or ``(None, reason)`` if it cannot be pruned."""
    pass_through = {optype.ELEMENTWISE, optype.CONCAT, optype.SPLIT, optype.RESHAPE, optype.UNBIND,
                    optype.EXPAND, optype.SLICE, optype.PRELU}
    root = tp_group[0].dep.target.module
    size = graph.get_out_channels(root)
    pairs: dict[str, dict[str, list[tuple[int, int]]]] = {"out": defaultdict(list), "in": defaultdict(list),
                                                          "norm": defaultdict(list)}
    channels: dict[tuple[str, str], int] = {}
    for item in tp_group:
        node, handler = item.dep.target, item.dep.handler
        module, name = node.module, names.get(node.module)
        writes = graph.is_out_channel_pruning_fn(handler)
        reads = graph.is_in_channel_pruning_fn(handler)
        if node.type == optype.OUTPUT or (writes and node.grad_fn in output_grad_fns):
            return None, "its channels are a model output"
        if any(root_index is None for root_index in item.root_idxs):
            return None, f"no channel mapping through {node.name}"
        indices = list(zip(item.root_idxs, item.idxs, strict=True))
        if name is not None and name in layers:
            if isinstance(module, _ConvNd) and module.groups > 1 and not (
                    module.groups == module.in_channels == module.out_channels):
                return None, f"{name} is a grouped convolution"
            if writes:
                pairs["out"][name] += indices
                channels["out", name] = layers[name].out_mask.numel()
            if reads:
                pairs["in"][name] += indices
                channels["in", name] = layers[name].in_mask.numel()
        elif isinstance(module, NORM_TYPES):
            if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
                return None, f"{name} normalises over several dimensions"
            pairs["norm"][name] += indices
            channels["norm", name] = graph.get_out_channels(module)
        elif node.type not in pass_through:
            return None, f"{node.name} holds channels the masks cannot reach"
    if not pairs["out"]:
        return None, "no SPA layer writes its channels"
    maps = {
        role: {name: _channel_map(role_pairs[name], channels[role, name])
               for name in _ordered(role_pairs, names)}
        for role, role_pairs in pairs.items()
    }
    covered = torch.zeros(size, dtype=torch.bool)
    for channel_map in maps["out"].values():
        covered[channel_map.group_index] = True
    if not covered.all():
        return None, "some channels have no SPA producer"
    return ChannelGroup(size, maps["out"], maps["in"], maps["norm"]), ""


def _ordered(role_pairs: dict[str, list], names: dict[nn.Module, str]) -> list[str]:
    order = {name: position for position, name in enumerate(names.values())}
    return sorted(role_pairs, key=order.__getitem__)


def _channel_map(pairs: list[tuple[int, int]], channels: int) -> ChannelMap:
    pairs = sorted(set(pairs))
    group_index = torch.tensor([g for g, _ in pairs], dtype=torch.int64)
    layer_index = torch.tensor([layer for _, layer in pairs], dtype=torch.int64)
    return ChannelMap(group_index, layer_index, channels)


__all__ = ["AttentionGroup", "ChannelGroup", "ChannelMap", "NormChannelMask", "channel_groups",
           "install_norm_masks", "remove_norm_masks"]
