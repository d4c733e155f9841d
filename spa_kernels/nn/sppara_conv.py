"""``SPPaRAConv1d/2d/3d``: frozen convolutions with a full-rank centre-tap adapter and channel masks."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .. import functional
from .adapted_conv import DEFAULT_INIT_RANGE, AdaptedConvNd
from .adapter import check_init_range
from .channel_masked import held_tensor


class _SPPaRAConvNd(AdaptedConvNd):
    r"""Channel-masked convolution with a frozen weight and a parallel residual adapter (SPPaRA).

    .. math::
        W_{\text{eff}}[o, i, c] = W[o, i, c] + P_{o,i}, \qquad
        y_o = b_o + \sum_{i \in S} W_{\text{eff}}[o, i] \star x_i \quad (o \in O),
        \qquad y_o = 0 \quad (o \notin O)

    with ``c`` the kernel's centre tap: the adapter ``P`` is a parallel 1×1
    convolution with the same stride.  ``S``/``O`` are the active input/output
    channels (``in_mask``/``out_mask``); only the active block is computed.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
        bias, padding_mode, device, dtype: as :class:`torch.nn.Conv2d`.  Kernel
            sizes must be odd (each dimension may differ).  Every ``padding_mode``
            works (non-zero modes are padded with ``F.pad`` before the kernel).
            Grouped layers run on the reference backend.
        init_range: ``P`` starts uniform in ``±init_range`` (``None``/0: zero).
        backend: kernel backend (``None`` = auto), see :func:`spa_kernels.use_backend`.

    Parameters and buffers (state-dict keys of sp_adapters 0.7.1, plus the masks):
        weight: ``(out, in/groups, *kernel_size)``, ``requires_grad=False``.  Setting
            it to True gives masked fine-tuning: its gradient covers the active
            block only.
        bias: ``(out,)`` or ``None``.
        adapter: ``(out, in/groups)`` = ``P``.
        in_mask: bool ``(in,)``.   out_mask: bool ``(out,)``.  All True initially.

    Shapes: input ``(N, in, *spatial)`` or ``(in, *spatial)`` → output
    ``(N, out, *spatial_out)``, exactly zero on pruned output channels.

    State dicts: one saved by the sp_adapters layer loads with ``strict=True``
    (absent masks mean all channels active); one saved here loads into
    sp_adapters with ``strict=False``, its ``unexpected_keys`` exactly the masks.
    """

    _sp_adapters_names: tuple[str, ...]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        init_range: float | None = DEFAULT_INIT_RANGE,
        backend: str | None = None,
    ) -> None:
        init_range = check_init_range(init_range)
        self._init_conv(in_channels, out_channels, kernel_size, stride, padding, dilation,
                        groups, bias, padding_mode, device, dtype, backend)
        self.init_range = init_range
        self.adapter = nn.Parameter(torch.empty(out_channels, in_channels // groups, device=device, dtype=dtype))
        self.reset_parameters()

    def _reset_adapter(self) -> None:
        bound = self.init_range or 0.0
        nn.init.uniform_(self.adapter, -bound, bound)  # as sp_adapters (same random draws)

    def _centre_term(self, out_idx: Tensor | None, in_idx: Tensor | None) -> Tensor:
        adapter = self.adapter.detach()
        if out_idx is not None and in_idx is not None:
            return adapter[out_idx.unsqueeze(1), in_idx]
        if out_idx is not None:
            return adapter.index_select(0, out_idx)
        if in_idx is not None:
            return adapter.index_select(1, in_idx)
        return adapter.clone()

    def _copy_adapter_from(self, module: nn.Module) -> None:
        self.adapter.copy_(module.adapter)

    def forward(self, input: Tensor) -> Tensor:
        x, unbatched = self._prepare_input(input)
        y = functional.sppara_conv_trusted(
            x, held_tensor(self, "weight"), held_tensor(self, "adapter"), held_tensor(self, "bias"), self.in_idx,
            self.out_idx, stride=self.stride, padding=self._kernel_padding(), dilation=self.dilation,
            groups=self.groups, backend=self.backend, compact_input=self.compact_input,
            compact_output=self.compact_output,
        )
        return y.squeeze(0) if unbatched else y

    @classmethod
    def from_module(
        cls,
        module: _ConvNd,
        init_range: float | None = DEFAULT_INIT_RANGE,
        *,
        backend: str | None = None,
    ):
        """Wrap a trained convolution: copy its weight (frozen), bias, device, dtype and geometry.

        Args:
            module: a torch ``nn.ConvNd`` of this dimension (gets a fresh adapter),
                or an ``sp_adapters.SPPaRAConvNd`` / SPPaRA layer of this class whose
                adapter is copied too (masks are copied from a layer of this class).
            init_range, backend: as the constructor.

        Raises:
            TypeError: ``module`` is not such a layer, or holds an SPLoRA adapter.
            ValueError: ``module`` is lazy and not yet initialised, or has an even kernel.
        """
        copy_adapter = cls._check_source(module)
        layer = cls(**cls._geometry(module), init_range=init_range, backend=backend)
        layer._copy_from(module, copy_adapter)
        return layer

    def extra_repr(self) -> str:
        return f"{_ConvNd.extra_repr(self)}, {self._active_repr()}"


class SPPaRAConv1d(_SPPaRAConvNd, nn.Conv1d):
    __doc__ = _SPPaRAConvNd.__doc__
    _nd = 1
    _sp_adapters_names = ("SPPaRAConv1d",)


class SPPaRAConv2d(_SPPaRAConvNd, nn.Conv2d):
    __doc__ = _SPPaRAConvNd.__doc__
    _nd = 2
    _sp_adapters_names = ("SPPaRAConv2d",)


class SPPaRAConv3d(_SPPaRAConvNd, nn.Conv3d):
    __doc__ = _SPPaRAConvNd.__doc__
    _nd = 3
    _sp_adapters_names = ("SPPaRAConv3d",)
