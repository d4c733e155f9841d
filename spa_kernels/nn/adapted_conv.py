"""What the SPA convolutions share: construction, padding, conversion, merging.

``SPLoRAConvNd`` (``splora_conv.py``) and ``SPPaRAConvNd`` (``sppara_conv.py``)
differ only in their adapter: a rank-``r`` product ``s·B A`` or a full-rank ``P``,
added to the kernel's centre tap.  Everything else lives here: the frozen
``nn.ConvNd`` weight, the channel masks, padding modes, unbatched inputs,
``from_module``, ``to_module`` and ``compact``.

Padding: ``padding`` may be a number, a tuple, ``"valid"`` or ``"same"``; the
kernels always receive explicit integers.  ``padding_mode`` other than
``"zeros"`` is applied here with ``F.pad`` (as ``torch.nn.ConvNd`` does) and the
kernel then runs with zero padding, so every torch padding mode works.

Groups: grouped and depthwise convolutions are accepted; the fused kernels run
``groups=1`` only, so the functional layer sends grouped layers to the
reference backend.  ``compact`` handles ``groups=1``, depthwise layers whose
input and output masks agree, and unpruned grouped layers.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.conv import _ConvNd

from ..backend import check_groups, check_name
from .channel_masked import ChannelMasked

DEFAULT_INIT_RANGE = 1e-4

CONV_TYPES: dict[int, type[_ConvNd]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SP_ADAPTERS_CONV_NAMES = tuple(f"{kind}Conv{nd}d" for kind in ("SPLoRA", "SPPaRA") for nd in (1, 2, 3))


def sp_adapters_class(name: str) -> type[nn.Module] | None:
    """``sp_adapters.<name>`` if that library is already imported, else ``None``.

    A layer of sp_adapters can only exist once the library is imported, so looking
    in ``sys.modules`` spares importing it (and torch_pruning) ourselves.
    """
    sp_adapters = sys.modules.get("sp_adapters")
    return None if sp_adapters is None else getattr(sp_adapters, name, None)


def plain_conv(conv_type: type[_ConvNd], like: _ConvNd, weight: Tensor, bias: Tensor | None,
               groups: int) -> _ConvNd:
    """A ``conv_type`` with ``like``'s geometry holding ``weight``/``bias`` (no throwaway init)."""
    out_channels, in_per_group = weight.shape[:2]
    with warnings.catch_warnings():  # torch warns when it initialises a 0-channel weight
        warnings.simplefilter("ignore")
        conv = conv_type(
            in_per_group * groups, out_channels, like.kernel_size, like.stride, like.padding,
            like.dilation, groups, bias is not None, like.padding_mode, device="meta",
        )
    conv.weight = nn.Parameter(weight)
    if bias is not None:
        conv.bias = nn.Parameter(bias)
    return conv.train(like.training)


class AdaptedConvNd(ChannelMasked):
    """Base of the SPA convolutions: a frozen ``nn.ConvNd`` with masks and an adapter.

    Concrete classes inherit from this class and from ``nn.Conv1d/2d/3d`` (so they
    are instances of the torch layer and keep its attributes), set ``_nd``, and
    implement the adapter hooks: ``_reset_adapter``, ``_centre_term``,
    ``_copy_adapter_from`` and ``forward``.
    """

    _nd: int
    # sp_adapters class names that this class takes the adapter of.
    _sp_adapters_names: tuple[str, ...] = ()

    def _init_conv(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride,
        padding,
        dilation,
        groups: int,
        bias: bool,
        padding_mode: str,
        device,
        dtype,
        backend: str | None,
    ) -> None:
        """The torch constructor's checks and attributes, then a frozen weight and the masks.

        ``reset_parameters`` does nothing until the adapter exists, so the torch
        constructor spends no random numbers: equal seeds give the same layer as
        sp_adapters once the subclass has built its adapter and reset everything.
        """
        CONV_TYPES[self._nd].__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation,
            groups, bias, padding_mode, device=device, dtype=dtype,
        )
        even = [k for k in self.kernel_size if k % 2 == 0]
        if even:
            raise ValueError(
                f"kernel_size must be odd in every dimension (the adapter sits on the centre tap), "
                f"got kernel_size={self.kernel_size}"
            )
        self.weight.requires_grad_(False)
        self.backend = None if backend is None else check_name(backend)
        if self.backend not in (None, "auto"):
            check_groups(self.backend, self.groups)  # fail at construction, not at the first forward
        self._init_masks(in_channels, out_channels, self.weight.device)

    # ------------------------------------------------------------------ adapter hooks

    def _reset_adapter(self) -> None:
        raise NotImplementedError

    def _centre_term(self, out_idx: Tensor | None, in_idx: Tensor | None) -> Tensor:
        """The adapter's centre-tap term restricted to rows ``out_idx`` and columns ``in_idx``.

        Columns index the weight's second dimension (``in/groups``); ``None`` means all.
        """
        raise NotImplementedError

    def _copy_adapter_from(self, module: nn.Module) -> None:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Weight and bias like ``nn.ConvNd``, then the adapter: sp_adapters' order."""
        if getattr(self, "adapter", None) is None:
            return  # called by the torch constructor; __init__ calls it again
        _ConvNd.reset_parameters(self)
        self._reset_adapter()

    # ------------------------------------------------------------------ forward helpers

    def _kernel_padding(self) -> tuple[int, ...]:
        """Explicit zero padding for the kernel (``"same"``/``"valid"`` resolved)."""
        if self.padding_mode != "zeros" or self.padding == "valid":
            return (0,) * self._nd  # non-zero modes are padded by _pad_input
        if self.padding == "same":
            # odd kernels: symmetric, as torch computes it
            return tuple(d * (k - 1) // 2 for d, k in zip(self.dilation, self.kernel_size, strict=True))
        return tuple(self.padding)

    def _prepare_input(self, input: Tensor) -> tuple[Tensor, bool]:
        """Batched, mode-padded input, and whether a batch dimension was added."""
        unbatched = input.dim() == self._nd + 1
        if unbatched:
            input = input.unsqueeze(0)
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        return input, unbatched

    # ------------------------------------------------------------------ conversion

    @classmethod
    def _check_source(cls, module: nn.Module) -> bool:
        """Check ``module`` for ``from_module``; True if its adapter is to be copied."""
        conv_type = CONV_TYPES[cls._nd]
        if not isinstance(module, conv_type):
            raise TypeError(f"module must be an nn.{conv_type.__name__} or an SPA layer of that "
                            f"dimension, got {type(module).__name__}")
        if isinstance(module.weight, nn.parameter.UninitializedParameter):
            raise ValueError("module has uninitialised (lazy) parameters; run one forward pass first")
        same_kind = [sp_adapters_class(name) for name in cls._sp_adapters_names]
        if isinstance(module, cls) or any(t is not None and isinstance(module, t) for t in same_kind):
            return True
        any_kind = [sp_adapters_class(name) for name in SP_ADAPTERS_CONV_NAMES]
        if isinstance(module, AdaptedConvNd) or any(t is not None and isinstance(module, t) for t in any_kind):
            raise TypeError(f"{cls.__name__}.from_module cannot take the adapter of a "
                            f"{type(module).__name__}; convert it with the matching SPA class")
        return False

    @classmethod
    def _geometry(cls, module: _ConvNd) -> dict:
        return {
            "in_channels": module.in_channels, "out_channels": module.out_channels,
            "kernel_size": module.kernel_size, "stride": module.stride, "padding": module.padding,
            "dilation": module.dilation, "groups": module.groups, "bias": module.bias is not None,
            "padding_mode": module.padding_mode, "device": module.weight.device, "dtype": module.weight.dtype,
        }

    def _copy_from(self, module: _ConvNd, copy_adapter: bool) -> None:
        with torch.no_grad():
            self.weight.copy_(module.weight)
            if module.bias is not None:
                self.bias.copy_(module.bias)
            if copy_adapter:
                self._copy_adapter_from(module)
        if isinstance(module, AdaptedConvNd):
            self.set_masks(module.in_mask, module.out_mask)
        self.train(module.training)

    def _centre(self) -> tuple:
        return (slice(None), slice(None)) + tuple(k // 2 for k in self.kernel_size)

    def _active_weight_mask(self) -> Tensor | None:
        """Bool ``(out, in/groups)``: which weight entries connect an active input to an active output."""
        if self.in_idx is None and self.out_idx is None:
            return None
        out_channels, in_per_group = self.weight.shape[:2]
        if self.groups == 1:
            return self.out_mask[:, None] & self.in_mask[None, :]
        out_per_group = out_channels // self.groups
        device = self.in_mask.device
        group = torch.arange(out_channels, device=device) // out_per_group
        in_channel = group[:, None] * in_per_group + torch.arange(in_per_group, device=device)[None, :]
        return self.out_mask[:, None] & self.in_mask[in_channel]

    def _active_bias(self, compact: bool) -> Tensor | None:
        if self.bias is None:
            return None
        bias = self.bias.detach()
        if self.out_idx is None:
            return bias.clone()
        if compact:
            return bias.index_select(0, self.out_idx)
        return bias.masked_fill(~self.out_mask, 0)

    @torch.no_grad()
    def to_module(self) -> _ConvNd:
        """The merged full-size torch convolution, with ``to_module()(x) == self(x)``.

        Its weight is ``W`` plus the adapter at the centre tap on the active block
        (pruned output filters and pruned input channels zeroed); its bias is ``b``
        at active outputs and zero elsewhere.  Same kernel size, stride, padding,
        dilation, groups and padding mode.  No tensor larger than the weight is built.
        """
        weight = self.weight.detach().clone()
        centre = self._centre()
        weight[centre] += self._centre_term(None, None)
        active = self._active_weight_mask()
        if active is not None:
            weight.masked_fill_(~active.view(*active.shape, *(1,) * self._nd), 0)
        return plain_conv(CONV_TYPES[self._nd], self, weight, self._active_bias(compact=False), self.groups)

    @torch.no_grad()
    def compact(self) -> _ConvNd:
        """A physically smaller torch convolution over the active channels.

        ``compact()(x[:, S]) == self(x)[:, O]`` with ``S``/``O`` the True positions of
        ``in_mask``/``out_mask``: ``|S|`` input and ``|O|`` output channels, weight
        ``W[O][:, S]`` plus the adapter at the centre tap, bias ``b[O]``.

        Supported: ``groups=1``; depthwise layers (``groups == in == out``) whose
        ``in_mask`` equals ``out_mask``; and grouped layers with every channel
        active (then the same as :meth:`to_module`).

        Raises:
            NotImplementedError: any other grouped layer, whose active channels need
                not form equal groups.
        """
        in_idx, out_idx = self.in_idx, self.out_idx
        conv_type = CONV_TYPES[self._nd]
        if self.groups != 1:
            if in_idx is None and out_idx is None:
                return self.to_module()
            depthwise = self.groups == self.in_channels == self.out_channels
            if not depthwise or not torch.equal(self.in_mask, self.out_mask):
                raise NotImplementedError(
                    f"compact() of a grouped convolution (groups={self.groups}) needs a depthwise "
                    "layer with in_mask == out_mask (or no pruning); use to_module() instead"
                )
            if out_idx.numel() == 0:
                raise NotImplementedError("compact() of a depthwise layer with every channel pruned "
                                          "(a convolution needs groups >= 1); use to_module() instead")
            weight = self.weight.detach().index_select(0, out_idx)
            weight[self._centre()] += self._centre_term(out_idx, None)
            return plain_conv(conv_type, self, weight, self._active_bias(compact=True), out_idx.numel())
        weight = self.weight.detach()
        if in_idx is not None and out_idx is not None:
            weight = weight[out_idx.unsqueeze(1), in_idx]  # both at once: no |O|×in step
        elif out_idx is not None:
            weight = weight.index_select(0, out_idx)
        elif in_idx is not None:
            weight = weight.index_select(1, in_idx)
        else:
            weight = weight.clone()
        weight[self._centre()] += self._centre_term(out_idx, in_idx)
        return plain_conv(conv_type, self, weight, self._active_bias(compact=True), 1)

    def _active_repr(self) -> str:
        active_in = self.in_channels if self.in_idx is None else self.in_idx.numel()
        active_out = self.out_channels if self.out_idx is None else self.out_idx.numel()
        return f"active_in={active_in}, active_out={active_out}"
