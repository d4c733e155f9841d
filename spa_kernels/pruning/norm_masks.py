"""Norm hooks: exact zeros after the norm layers of a channel group.

The frozen base is shared across tasks, so a norm layer is never changed: a forward
hook multiplies its output (out of place) by the producers' ``out_mask``, read from
the producer's buffer (what a task package stores) and cached until that buffer
changes.  :meth:`spa_kernels.pruning.ChannelGroup.apply` installs them.  A norm that
runs on compact activations (``compact_channels`` True) holds no pruned channel, so its
hook passes the output through.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..nn import ChannelMasked


@dataclass(eq=False)
class _MaskSource:
    """Norm channels ``norm_index`` follow ``producer.out_mask[producer_index]``."""

    producer: ChannelMasked
    producer_index: Tensor
    norm_index: Tensor


class NormChannelMask:
    """Forward hook multiplying a norm layer's output by its channels' producer masks.

    Channels no group covers stay 1.  The float mask is cached per device, dtype
    and rank of the output and rebuilt only when a producer's ``out_mask`` buffer
    changes: another tensor (``.to()``, ``load_state_dict(assign=True)``) or a new
    in-place version (``set_masks``, ``load_state_dict``).
    """

    def __init__(self, name: str, channels: int):
        self.name = name
        self.channels = channels
        self.sources: dict[tuple[int, ...], list[_MaskSource]] = {}
        self._key: tuple | None = None  # what the cached mask was built for
        self._versions: list[int] = []
        self._buffers: list[Tensor] = []
        self._mask: Tensor | None = None

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickle) gets new mask buffers whose version counters restart
        # at zero: a cached mask could match their versions by chance and go stale.
        return {**self.__dict__, "_key": None, "_versions": [], "_buffers": [], "_mask": None}

    def set_sources(self, key: tuple[int, ...], sources: list[_MaskSource]) -> None:
        """Register (or replace) the sources of one group's norm channels ``key``."""
        self.sources[key] = sources
        self._key = None

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        if getattr(module, "compact_channels", False):
            # Under compact activations the norm outputs the active channels only:
            # nothing pruned is left to zero (spa_kernels.compact_activations).
            return output
        dim = _channel_dim(module, output)
        if output.shape[dim] != self.channels:
            raise RuntimeError(f"norm layer {self.name!r} gave {output.shape[dim]} channels, its channel "
                               f"group expects {self.channels}")
        mask = self._float_mask(output, dim)
        return output if mask is None else output * mask

    def _float_mask(self, output: Tensor, dim: int) -> Tensor | None:
        if torch.compiler.is_compiling():
            # Traced: the mask is built from the mask buffers inside the graph (a few small
            # ops), so a mask change needs no recompile and nothing reads values on the host.
            return self._build(output, dim, skip_if_full=False)
        buffers = [source.producer.out_mask for group in self.sources.values() for source in group]
        versions = [buffer._version for buffer in buffers]
        key = (output.device, output.dtype, output.dim(), dim)
        stale = (key != self._key or versions != self._versions or len(buffers) != len(self._buffers)
                 or any(new is not old for new, old in zip(buffers, self._buffers, strict=True)))
        if stale:
            self._mask = self._build(output, dim)
            self._key, self._versions, self._buffers = key, versions, buffers
        return self._mask

    def _build(self, output: Tensor, dim: int, skip_if_full: bool = True) -> Tensor | None:
        mask = torch.ones(self.channels, device=output.device, dtype=output.dtype)
        for group in self.sources.values():
            for source in group:
                out_mask = source.producer.out_mask
                values = out_mask.index_select(0, source.producer_index.to(out_mask.device))
                mask[source.norm_index.to(output.device)] = values.to(output.device, output.dtype)
        if skip_if_full and bool(mask.all()):  # one host sync per mask change; nothing pruned costs nothing
            return None
        shape = [1] * output.dim()
        shape[dim] = self.channels
        return mask.view(shape)


def _channel_dim(module: nn.Module, output: Tensor) -> int:
    """The channel dimension of a norm layer's output: last for layer norm, else 1 (0 if unbatched)."""
    if isinstance(module, nn.LayerNorm):
        return output.dim() - 1
    unbatched = isinstance(module, nn.modules.instancenorm._InstanceNorm) and (
        output.dim() == module._get_no_batch_dim())
    if unbatched:
        return 0
    return 1


def _norm_hook(norm: nn.Module) -> NormChannelMask | None:
    for hook in norm._forward_hooks.values():
        if isinstance(hook, NormChannelMask):
            return hook
    return None


def install_norm_masks(model: nn.Module, groups: Iterable) -> None:
    """Make every norm layer of ``groups`` (:class:`~spa_kernels.pruning.ChannelGroup`) output exact
    zeros on its group's pruned channels.

    Installs one :class:`NormChannelMask` forward hook per norm layer (reused if
    present, so calling this again, or after :meth:`ChannelGroup.apply`, adds
    nothing).  Call it after loading a task package into a model whose hooks are
    gone (a fresh model): the masks themselves come from the producers' buffers.

    Raises:
        ValueError: ``model`` lacks a member of a group.
    """
    for group in groups:
        layers = group._layers(model)
        lookups = {name: channel_map.group_lookup(group.size) for name, channel_map in group.out_maps.items()}
        for norm_name, norm_map in group.norm_maps.items():
            try:
                norm = model.get_submodule(norm_name)
            except AttributeError:
                raise ValueError(f"model has no module named {norm_name!r}; was this group found on another "
                                 "model?") from None
            hook = _norm_hook(norm)
            if hook is None:
                hook = NormChannelMask(norm_name, norm_map.channels)
                norm.register_forward_hook(hook)
            sources = []
            unassigned = torch.ones(norm_map.group_index.numel(), dtype=torch.bool)
            for producer_name, lookup in lookups.items():
                producer_channel = lookup[norm_map.group_index]
                take = unassigned & (producer_channel >= 0)
                if take.any():
                    sources.append(_MaskSource(layers[producer_name], producer_channel[take],
                                               norm_map.layer_index[take]))
                    unassigned &= ~take
            hook.set_sources(tuple(sorted(norm_map.layer_index.tolist())), sources)


def remove_norm_masks(model: nn.Module) -> int:
    """Remove every :class:`NormChannelMask` hook from ``model``; returns how many were removed."""
    removed = 0
    for module in model.modules():
        for key in [key for key, hook in module._forward_hooks.items() if isinstance(hook, NormChannelMask)]:
            del module._forward_hooks[key]
            module._forward_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_always_called.pop(key, None)
            removed += 1
    return removed
