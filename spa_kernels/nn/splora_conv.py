"""``SPLoRAConv1d/2d/3d``: frozen convolutions with a low-rank centre-tap adapter and channel masks."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .. import functional
from .._validation import check_rank, check_scale
from .adapted_conv import DEFAULT_INIT_RANGE, AdaptedConvNd
from .adapter import LowRankAdapter
from .channel_masked import held_tensor

DEFAULT_RANK = 16


class _SPLoRAConvNd(AdaptedConvNd):
    r"""Channel-masked convolution with a frozen weight and a low-rank adapter (SPLoRA).

    .. math::
        W_{\text{eff}}[o, i, c] = W[o, i, c] + s\,(BA)_{o,i}, \qquad
        y_o = b_o + \sum_{i \in S} W_{\text{eff}}[o, i] \star x_i \quad (o \in O),
        \qquad y_o = 0 \quad (o \notin O)

    with ``c`` the kernel's centre tap: the adapter is a parallel 1×1 convolution
    with the same stride.  ``S``/``O`` are the active input/output channels
    (``in_mask``/``out_mask``); only the active block is computed.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
        bias, padding_mode, device, dtype: as :class:`torch.nn.Conv2d`.  Kernel
            sizes must be odd (each dimension may differ).  Every ``padding_mode``
            works (non-zero modes are padded with ``F.pad`` before the kernel).
            Grouped layers run on the reference backend.
        rank: adapter rank ``r``; a float below 1 is a fraction of ``out_channels``
            (rounded, as in sp_adapters).
        init_range: ``B`` starts uniform in ``±init_range`` (``None``/0: Kaiming).
        scale: adapter scale ``s``.
        backend: kernel backend (``None`` = auto), see :func:`spa_kernels.use_backend`.

    Parameters and buffers (state-dict keys of sp_adapters 0.7.1, plus the masks):
        weight: ``(out, in/groups, *kernel_size)``, ``requires_grad=False``.  Setting
            it to True gives masked fine-tuning: its gradient covers the active
            block only.
        bias: ``(out,)`` or ``None``.
        adapter.rows: ``(1, r, in/groups)`` = ``A``.   adapter.cols: ``(1, out, r)`` = ``B``.
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
        rank: int | float = DEFAULT_RANK,
        init_range: float | None = DEFAULT_INIT_RANGE,
        scale: float = 1.0,
        backend: str | None = None,
    ) -> None:
        scale = check_scale(scale)
        resolved_rank = check_rank(rank, out_channels)
        self._init_conv(in_channels, out_channels, kernel_size, stride, padding, dilation,
                        groups, bias, padding_mode, device, dtype, backend)
        self.scale = scale
        self.adapter = LowRankAdapter(in_channels // groups, out_channels, resolved_rank, init_range,
                                      device=device, dtype=dtype)
        self.reset_parameters()

    @property
    def rank(self) -> int:
        return self.adapter.rank

    def _reset_adapter(self) -> None:
        self.adapter.reset_parameters()

    def _centre_term(self, out_idx: Tensor | None, in_idx: Tensor | None) -> Tensor:
        rows, cols = self.adapter.rows[0].detach(), self.adapter.cols[0].detach()
        if out_idx is not None:
            cols = cols.index_select(0, out_idx)
        if in_idx is not None:
            rows = rows.index_select(1, in_idx)
        return (cols @ rows).mul_(self.scale)

    def _copy_adapter_from(self, module: nn.Module) -> None:
        self.adapter.rows.copy_(module.adapter.rows)
        self.adapter.cols.copy_(module.adapter.cols)

    def forward(self, input: Tensor) -> Tensor:
        x, unbatched = self._prepare_input(input)
        lora_a, lora_b = self._modules["adapter"].factors()
        # Keywords spelled out rather than unpacked from dicts built per call: a small layer's call is µs.
        y = functional.splora_conv_trusted(
            x, held_tensor(self, "weight"), lora_a, lora_b, held_tensor(self, "bias"), self.in_idx, self.out_idx,
            stride=self.stride, padding=self._kernel_padding(), dilation=self.dilation, groups=self.groups,
            scale=self.scale, backend=self.backend, compact_input=self.compact_input,
            compact_output=self.compact_output,
        )
        return y.squeeze(0) if unbatched else y

    @classmethod
    def from_module(
        cls,
        module: _ConvNd,
        rank: int | float = DEFAULT_RANK,
        init_range: float | None = DEFAULT_INIT_RANGE,
        *,
        scale: float = 1.0,
        backend: str | None = None,
    ):
        """Wrap a trained convolution: copy its weight (frozen), bias, device, dtype and geometry.

        Args:
            module: a torch ``nn.ConvNd`` of this dimension (gets a fresh adapter of
                ``rank``), or an ``sp_adapters.SPLoRAConvNd`` / SPLoRA layer of this
                class whose adapter is copied too (``rank`` and ``init_range`` are
                then ignored; masks are copied from a layer of this class).
            rank, init_range, scale, backend: as the constructor.

        Raises:
            TypeError: ``module`` is not such a layer, or holds an SPPaRA adapter.
            ValueError: ``module`` is lazy and not yet initialised, or has an even kernel.
        """
        copy_adapter = cls._check_source(module)
        if copy_adapter:
            rank = module.adapter.rows.shape[1]
        layer = cls(**cls._geometry(module), rank=rank, init_range=init_range, scale=scale, backend=backend)
        layer._copy_from(module, copy_adapter)
        return layer

    def extra_repr(self) -> str:
        return f"{_ConvNd.extra_repr(self)}, rank={self.rank}, scale={self.scale}, {self._active_repr()}"


class SPLoRAConv1d(_SPLoRAConvNd, nn.Conv1d):
    __doc__ = _SPLoRAConvNd.__doc__
    _nd = 1
    _sp_adapters_names = ("SPLoRAConv1d",)


class SPLoRAConv2d(_SPLoRAConvNd, nn.Conv2d):
    __doc__ = _SPLoRAConvNd.__doc__
    _nd = 2
    _sp_adapters_names = ("SPLoRAConv2d",)


class SPLoRAConv3d(_SPLoRAConvNd, nn.Conv3d):
    __doc__ = _SPLoRAConvNd.__doc__
    _nd = 3
    _sp_adapters_names = ("SPLoRAConv3d",)
