"""Compact activations: tensors between the SPA layers of a channel group hold only its active channels.

A pruned full-width model still carries its pruned channels, as exact zeros, through
every batch norm, activation, residual addition and pooling between two SPA layers:
at half density that is twice the memory traffic of the physically smaller network.
:func:`compact_activations` lets those tensors travel compacted instead, without
copying any weight: the frozen base stays one shared copy, and a mask change or
``load_task`` only rebuilds index lists, as it always does.

**What runs compact.**  A channel group (:func:`spa_kernels.pruning.channel_groups`) is
compacted when every layer on its channels can take a compact tensor:

- its producers write the whole output of an SPA linear or convolution with
  ``groups=1`` (they get ``compact_output``), its consumers read the whole input of
  one (``compact_input``); a concatenation, a split or a flatten that maps one channel
  onto several inputs makes the channel positions depend on more than one group, so
  such a group stays full width;
- its norms are batch norms (:class:`torch.nn.BatchNorm1d`/``2d``/``3d``), whose
  statistics are per channel and so the same on the active channels alone, or layer
  norms over the channels (:class:`torch.nn.LayerNorm` of one dimension), whose
  statistics over all channels, pruned zeros included, follow from the active ones
  (:class:`CompactLayerNorm`).  Exactly these classes, not subclasses, whose forward
  may differ.  Group and instance norms keep their group full width;
- everything else on the channels is an operation that acts channel by channel
  (activations, residual additions inside the group, pooling, dropout): that is what
  ``channel_groups`` requires of a prunable group.  Attention groups stay full width.

Inside a compacted group nothing reaches a module that expects full width: a group is
prunable only if its channels reach no model output and no layer other than SPA
layers and norms, so the boundaries of a compacted group are its producers' inputs
and its consumers' outputs, where the SPA layers themselves switch width.

**Norms.**  A norm of a compacted group gets a subclass of its own class
(:class:`CompactBatchNorm2d` and so on), so state-dict keys, ``isinstance`` checks and
task packages are unchanged.  Its forward gathers the affine parameters (and a batch
norm's running statistics) at the active channels; in training a batch norm writes
the updated statistics of those channels back in place (``index_copy_``), and the
statistics of pruned channels are left as they are.  The active channels are the group producer's ``out_idx``: the very
index list the producer compacted its output with, rebuilt by ``set_masks``,
``load_state_dict`` and ``load_task`` with no host sync in forward, and a symbol of
dynamic length under ``torch.compile``.  The norm-mask hooks pass a compact norm's
output through: it holds no pruned channel to zero.

**Masks must agree.**  All producers of a compacted group must keep the same channels
and every consumer must read exactly those (as :meth:`ChannelGroup.apply` and
``load_task`` leave them); otherwise the tensors would not line up.  A forward
pre-hook on the model checks this once per change of the index lists (one host sync
then, none while they stay the same) and raises naming the layers.

:func:`expand_activations` restores the full-width model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .nn import ChannelMasked, SPLoRALinear, SPLoRAMultiheadAttention
from .nn.adapted_conv import AdaptedConvNd
from .pruning import AttentionGroup, ChannelGroup, ChannelMap, channel_groups

logger = logging.getLogger("spa_kernels")


# --------------------------------------------------------------------------------------------------
# Norms on compact channels.


class CompactNorm(nn.Module):
    """What the norms running on compact channels share.

    Not instantiated: :func:`compact_activations` rebinds the ``__class__`` of an
    existing norm to a subclass of its own class (below) and sets ``channel_source``,
    a one-element tuple holding the group's first producer (a tuple, so that the
    producer is not registered as a child module and the state dict stays the same).
    """

    compact_channels = True  # read by the norm-mask hooks: nothing pruned to zero here
    full_width_class: type[nn.Module]
    channel_source: tuple[ChannelMasked]

    def _active_channels(self, input: Tensor, dim: int, channels: int) -> Tensor | None:
        """The producer's ``out_idx``: the channels ``input`` holds (``None``: all of them)."""
        # A copy of this norm traced without its SPA producer (the shadow model that
        # channel_groups builds) has a plain layer there, with no index list: full width.
        active = getattr(self.channel_source[0], "out_idx", None)
        if active is not None and input.shape[dim] != active.shape[0]:
            raise RuntimeError(f"a compact {self.full_width_class.__name__} got {input.shape[dim]} channels, its "
                               f"group keeps {active.shape[0]} of {channels}")
        return active


class CompactBatchNorm(CompactNorm, nn.modules.batchnorm._BatchNorm):
    """Batch norm on the active channels: parameters and statistics gathered, statistics written back."""

    def forward(self, input: Tensor) -> Tensor:
        active = self._active_channels(input, 1, self.num_features)
        if active is None:
            return self.full_width_class.forward(self, input)
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as the full-width norm
                momentum = 1.0 / float(self.num_batches_tracked)
        batch_statistics = self.training or (self.running_mean is None and self.running_var is None)
        running_mean = None if self.running_mean is None else self.running_mean.index_select(0, active)
        running_var = None if self.running_var is None else self.running_var.index_select(0, active)
        weight = None if self.weight is None else self.weight.index_select(0, active)
        bias = None if self.bias is None else self.bias.index_select(0, active)
        output = F.batch_norm(input, running_mean, running_var, weight, bias, batch_statistics, momentum,
                              self.eps)
        if self.training and running_mean is not None:
            # F.batch_norm updated the gathered copies; the pruned channels keep their statistics.
            with torch.no_grad():
                self.running_mean.index_copy_(0, active, running_mean)
                self.running_var.index_copy_(0, active, running_var)
        return output


class CompactBatchNorm1d(CompactBatchNorm, nn.BatchNorm1d):
    full_width_class = nn.BatchNorm1d


class CompactBatchNorm2d(CompactBatchNorm, nn.BatchNorm2d):
    full_width_class = nn.BatchNorm2d


class CompactBatchNorm3d(CompactBatchNorm, nn.BatchNorm3d):
    full_width_class = nn.BatchNorm3d


class CompactLayerNorm(CompactNorm, nn.LayerNorm):
    """Layer norm over the channels (last dimension) when only the active ones are present.

    The full-width norm averages over all ``C`` channels, the pruned ones being exact
    zeros.  With ``k`` active channels ``x``, the same statistics are
    ``mean = Σx / C`` and ``var = (Σ(x - mean)² + (C - k)·mean²) / C``: zeros sit at
    distance ``mean`` from the mean.  Computed in float32 for half-precision inputs.
    """

    full_width_class = nn.LayerNorm

    def forward(self, input: Tensor) -> Tensor:
        channels = self.normalized_shape[0]
        active = self._active_channels(input, -1, channels)
        if active is None:
            return nn.LayerNorm.forward(self, input)
        low_precision = input.dtype in (torch.float16, torch.bfloat16)
        x = input.float() if low_precision else input
        mean = x.sum(-1, keepdim=True) / channels
        centred = x - mean
        pruned = channels - active.shape[0]
        var = (centred.square().sum(-1, keepdim=True) + mean.square() * pruned) / channels
        output = centred * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            output = output * self.weight.index_select(0, active).to(output.dtype)
        if self.bias is not None:
            output = output + self.bias.index_select(0, active).to(output.dtype)
        if low_precision and not torch.is_autocast_enabled(input.device.type):
            output = output.to(input.dtype)  # as F.layer_norm: float32 under autocast, else the input's
        return output


COMPACT_NORMS: dict[type[nn.Module], type[CompactNorm]] = {
    nn.BatchNorm1d: CompactBatchNorm1d, nn.BatchNorm2d: CompactBatchNorm2d, nn.BatchNorm3d: CompactBatchNorm3d,
    nn.LayerNorm: CompactLayerNorm,
}
"""The norm classes that run on compact channels, and the class each gets meanwhile."""


# --------------------------------------------------------------------------------------------------
# The masks of a compacted group must agree.


class MaskAgreement:
    """Forward pre-hook: the index lists of every compacted group agree, or a clear error.

    Each group's producers' ``out_idx`` and consumers' ``in_idx`` must be the same
    channels.  The lists are compared by identity on every call (no sync) and by value
    only when one of them is a new tensor, i.e. after a mask change.  Under
    ``torch.compile`` nothing is checked (the values would have to be read on the host).
    """

    def __init__(self, groups: list[list[tuple[str, ChannelMasked, str]]]):
        self.groups = groups  # per group: (layer name, layer, "out_idx" or "in_idx")
        self._checked: list[list[Tensor | None]] | None = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if torch.compiler.is_compiling():
            return
        current = [[getattr(layer, side) for _, layer, side in members] for members in self.groups]
        if self._checked is not None and all(
                new is old for now, then in zip(current, self._checked, strict=True)
                for new, old in zip(now, then, strict=True)):
            return
        for members, lists in zip(self.groups, current, strict=True):
            _check_agreement(members, lists)
        self._checked = current


def _check_agreement(members: list[tuple[str, ChannelMasked, str]], lists: list[Tensor | None]) -> None:
    first_name, _, first_side = members[0]
    first = lists[0]
    for (name, _, side), idx in zip(members[1:], lists[1:], strict=True):
        same = (idx is None and first is None) or (
            idx is not None and first is not None and idx.numel() == first.numel()
            and bool(torch.equal(idx, first.to(idx.device))))
        if not same:
            mask = {"out_idx": "out_mask", "in_idx": "in_mask"}
            raise RuntimeError(
                f"compact activations need every layer of a channel group to keep the same channels, but "
                f"{name}.{mask[side]} differs from {first_name}.{mask[first_side]}; change masks with "
                "ChannelGroup.apply (or load_task), or call spa_kernels.expand_activations(model) first")


# --------------------------------------------------------------------------------------------------
# Which groups run compact.


def _is_whole_side(channel_map: ChannelMap, size: int) -> bool:
    """The map covers a layer side exactly: group channel k is layer channel k, nothing else."""
    if channel_map.channels != size or channel_map.layer_index.numel() != size:
        return False
    every = torch.arange(size)
    return torch.equal(channel_map.layer_index, every) and torch.equal(channel_map.group_index, every)


def _full_width_reason(model: nn.Module, group: ChannelGroup, layers: dict[str, ChannelMasked],
                       inside_attention: set[str]) -> str | None:
    """Why ``group`` must stay full width, or ``None`` when it can run compact."""
    if isinstance(group, AttentionGroup):
        return "attention heads are read by the attention core"
    for role, maps in (("producer", group.out_maps), ("consumer", group.in_maps)):
        for name, channel_map in maps.items():
            layer = layers.get(name)
            if layer is None:
                raise ValueError(f"model has no SPA layer named {name!r}; was this group found on another model?")
            if not isinstance(layer, (SPLoRALinear, AdaptedConvNd)):
                return f"{role} {name} is a {type(layer).__name__}, which has no compact mode"
            if getattr(layer, "groups", 1) != 1:
                return f"{role} {name} is a grouped convolution"
            if name in inside_attention:
                return f"{role} {name} is part of an attention layer"
            if not _is_whole_side(channel_map, group.size):
                return f"{role} {name} reads or writes the channels through a concatenation, split or flatten"
    for name, channel_map in group.norm_maps.items():
        norm = model.get_submodule(name)
        if type(norm) not in COMPACT_NORMS:
            return f"norm {name} is a {type(norm).__name__}, which has no compact forward"
        if isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) != 1:
            return f"norm {name} normalises over more than the channels"
        if not _is_whole_side(channel_map, group.size):
            return f"norm {name} covers more than the group"
    return None


def _check_groups(groups) -> list[ChannelGroup]:
    if isinstance(groups, ChannelGroup) or not isinstance(groups, Iterable):
        raise TypeError(f"groups must be a list of ChannelGroup, got {type(groups).__name__}")
    groups = list(groups)
    for group in groups:
        if not isinstance(group, ChannelGroup):
            raise TypeError(f"groups must hold ChannelGroup objects, got a {type(group).__name__}")
    return groups


# --------------------------------------------------------------------------------------------------
# Public API.


def compact_activations(
    model: nn.Module,
    example_inputs: Tensor | Sequence | Mapping,
    *,
    groups: Iterable[ChannelGroup] | None = None,
) -> nn.Module:
    """Let the tensors inside each channel group of ``model`` hold only the active channels.

    In place: SPA layers get ``compact_input``/``compact_output``, the batch norms of
    compacted groups a compact forward (see the module doc); no weight is copied and
    the state dict is unchanged.  Outputs and gradients are those of the full-width
    model up to the order of sums; the running statistics of pruned batch-norm
    channels are no longer updated.  Masks may change afterwards through
    :meth:`ChannelGroup.apply`, ``set_masks`` of a whole group, or ``load_task``.

    Args:
        model: a converted model (:func:`spa_kernels.convert`), pruned or not.  Called
            again on a compact model, it starts over from full width.
        example_inputs: one forward's inputs (a tensor, a tuple/list of positional
            inputs or a dict of keyword inputs) to find the channel groups with.
        groups: the groups, if already found with
            :func:`spa_kernels.pruning.channel_groups` on this model
            (``example_inputs`` is then not traced).

    Returns:
        ``model``.

    Raises:
        TypeError: ``model`` is not a module, or ``groups`` holds something other than
            channel groups.
        ValueError: a group names a layer ``model`` does not have.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    expand_activations(model)
    groups = channel_groups(model, example_inputs) if groups is None else _check_groups(groups)
    layers = {name: module for name, module in model.named_modules() if isinstance(module, ChannelMasked)}
    inside_attention = {
        f"{name}.{child}" if name else child
        for name, module in model.named_modules() if isinstance(module, SPLoRAMultiheadAttention)
        for child, _ in module.named_modules() if child
    }
    agreement = []
    for group in groups:
        reason = _full_width_reason(model, group, layers, inside_attention)
        if reason is not None:
            logger.debug("channels written by %s stay full width: %s", ", ".join(group.producers), reason)
            continue
        producers = [layers[name] for name in group.producers]
        for layer in producers:
            layer.compact_output = True
        for name in group.consumers:
            layers[name].compact_input = True
        for name in group.norms:
            norm = model.get_submodule(name)
            norm.__class__ = COMPACT_NORMS[type(norm)]
            norm.channel_source = (producers[0],)
        agreement.append([(name, layers[name], "out_idx") for name in group.producers]
                         + [(name, layers[name], "in_idx") for name in group.consumers])
        logger.debug("channels written by %s run compact", ", ".join(group.producers))
    if agreement:
        model.register_forward_pre_hook(MaskAgreement(agreement))
    return model


def expand_activations(model: nn.Module) -> nn.Module:
    """Undo :func:`compact_activations`: every tensor of ``model`` full width again, in place.

    Flags off, batch norms back to their own class (their running statistics as they
    are now), the mask check removed.  A model that was never compacted is returned
    unchanged.

    Returns:
        ``model``.

    Raises:
        TypeError: ``model`` is not a module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if isinstance(module, ChannelMasked):
            module.__dict__.pop("compact_input", None)
            module.__dict__.pop("compact_output", None)
        if isinstance(module, CompactNorm):
            module.__class__ = module.full_width_class
            module.__dict__.pop("channel_source", None)
        for key in [key for key, hook in module._forward_pre_hooks.items() if isinstance(hook, MaskAgreement)]:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
    return model


__all__ = ["COMPACT_NORMS", "CompactBatchNorm", "CompactBatchNorm1d", "CompactBatchNorm2d", "CompactBatchNorm3d",
           "CompactLayerNorm", "CompactNorm", "MaskAgreement", "compact_activations", "expand_activations"]
