"""Channel masks shared by every SPA module: bool masks in, index lists out.

A module keeps two persistent bool buffers, ``in_mask`` and ``out_mask``, which
are what a checkpoint stores, and two int64 index lists, ``in_idx`` and
``out_idx``, which are what the kernels read.  The index lists are derived from
the masks once per change (``set_masks``, ``load_state_dict``, ``.to()``), because
turning a mask into indices needs its values on the host: a device sync that
``forward`` must never pay.  An index list is ``None`` while every channel is
active, so the kernels take their unmasked path.

The index lists are plain tensor attributes, not buffers: torch.compile gives
module buffers static shapes and would recompile the model at every mask change,
while the length of a plain attribute is a symbol (the first pruning of a layer
recompiles once; later mask changes reuse the graph).

Compact activations: with ``compact_input`` set, a layer reads only its active input
channels (``len(in_idx)`` of them, in increasing order); with ``compact_output`` it
writes only its active outputs.  :func:`spa_kernels.compact_activations` sets both
for the layers inside one channel group, so the tensors between them never hold
the pruned channels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._validation import check_mask

MASK_NAMES = ("in_mask", "out_mask")

_MISSING = object()


def held_tensor(module: nn.Module, name: str) -> Tensor | None:
    """``module.<name>`` for a parameter, read straight from the module's parameter dict.

    ``nn.Module`` reaches parameters through ``__getattr__``, after a failed
    attribute lookup: about 1 µs a read, several per forward of a small layer.
    Where the name is not in the dict (a parametrization or weight norm put it
    elsewhere) the ordinary lookup finds it.
    """
    value = module._parameters.get(name, _MISSING)
    return getattr(module, name) if value is _MISSING else value


def indices_from_mask(mask: Tensor) -> Tensor | None:
    """Sorted int64 positions of the True entries of ``mask``; ``None`` if all are True."""
    if mask.device.type == "meta":  # no values to read; real masks arrive with load_state_dict
        return None
    idx = torch.nonzero(mask).flatten()  # row-major order: already strictly increasing
    if idx.numel() == mask.numel():
        return None
    # The length changes with every mask change: a compiled model treats it as a symbol
    # (one recompile when a layer is first pruned, none for later changes) instead of
    # specialising on it like on other module buffers and recompiling each time.
    torch._dynamo.maybe_mark_dynamic(idx, 0)
    return idx


class ChannelMasked(nn.Module):
    """Base of the SPA modules: input/output channel masks and their index lists.

    Subclasses have a ``weight`` parameter and call :meth:`_init_masks` in their
    constructor.  Masks should be
    changed through :meth:`set_masks` (or ``load_state_dict``); writing into the
    mask buffers directly leaves the index lists stale.
    """

    in_mask: Tensor
    out_mask: Tensor
    in_idx: Tensor | None
    out_idx: Tensor | None
    # Plain attributes, not buffers: a compact mode is a way of running the model,
    # not part of a checkpoint or a task package.
    compact_input: bool = False
    compact_output: bool = False

    def __setattr__(self, name: str, value: object) -> None:
        # Code that rebuilds a layer's weight from outside, like torch.nn.utils.fusion's
        # conv/linear + batch-norm folding, scales W but not the adapter, and cannot
        # give pruned outputs the norm's shift: the result would be silently wrong.
        # Such code assigns a new tensor to ``weight``; refuse it.  Loading a state
        # dict with assign=True is the one assignment that keeps the layer exact.
        parameters = self.__dict__.get("_parameters")
        if (name == "weight" and isinstance(value, Tensor) and parameters is not None
                and parameters.get("weight") is not None and not self.__dict__.get("_loading_state", False)):
            raise TypeError(
                f"{type(self).__name__}.weight cannot be replaced by assignment: code that rewrites the base "
                "weight (e.g. torch.nn.utils.fusion.fuse_conv_bn_eval) would leave the adapter and masks "
                "out of it.  Change it in place (layer.weight.copy_(w) under torch.no_grad()) or with "
                "load_state_dict; to fold a following norm, fuse layer.to_module(), the merged plain layer")
        super().__setattr__(name, value)

    def _init_masks(self, in_channels: int, out_channels: int, device: torch.device | str | None) -> None:
        self.register_buffer("in_mask", torch.ones(in_channels, dtype=torch.bool, device=device))
        self.register_buffer("out_mask", torch.ones(out_channels, dtype=torch.bool, device=device))
        self.in_idx = None
        self.out_idx = None

    def set_masks(self, in_mask: Tensor | None = None, out_mask: Tensor | None = None) -> None:
        """Set the active input and/or output channels.

        Args:
            in_mask: bool ``(in,)``, True for the active input channels ``S``;
                ``None`` keeps the current input mask.
            out_mask: bool ``(out,)``, True for the active output channels ``O``;
                ``None`` keeps the current output mask.

        Raises:
            TypeError: a mask is not a bool tensor.
            ValueError: a mask is not 1-D of the channel count.

        Both masks are checked before either is changed.  The masks may live on any
        device; they are copied onto the module's, and the index lists are rebuilt
        there (one host sync here, none in ``forward``).
        """
        if in_mask is not None:
            check_mask(in_mask, "in_mask", self.in_mask.numel())
        if out_mask is not None:
            check_mask(out_mask, "out_mask", self.out_mask.numel())
        with torch.no_grad():
            if in_mask is not None:
                self.in_mask.copy_(in_mask)
            if out_mask is not None:
                self.out_mask.copy_(out_mask)
        self._rebuild_indices()

    def _apply(self, fn, recurse: bool = True):
        module = super()._apply(fn, recurse)
        self._rebuild_indices()  # the index lists follow the masks' device (they are not buffers)
        return module

    def _rebuild_indices(self) -> None:
        self.in_idx = indices_from_mask(self.in_mask)
        self.out_idx = indices_from_mask(self.out_mask)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # sp_adapters checkpoints have no masks: such a layer is unpruned, so an
        # absent mask means "all channels active" and is not reported missing.
        absent = [name for name in MASK_NAMES if prefix + name not in state_dict]
        self.__dict__["_loading_state"] = True  # assign=True replaces the weight: allowed here
        try:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
        finally:
            del self.__dict__["_loading_state"]
        for name in absent:
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)
            mask = getattr(self, name)
            if mask.device == self.weight.device:
                mask.fill_(True)
            else:  # a meta-device module loaded with assign=True: give the mask real storage
                setattr(self, name, torch.ones(mask.shape, dtype=torch.bool, device=self.weight.device))
        for name in MASK_NAMES:
            mask = getattr(self, name)
            if mask.dtype != torch.bool:  # load_state_dict(assign=True) of a non-bool mask
                setattr(self, name, mask != 0)
        self._rebuild_indices()
