"""``SPLoRALinear``: a frozen linear layer with a low-rank adapter and channel masks."""

from __future__ import annotations

import sys
import warnings

import torch
from torch import Tensor, nn

from .._validation import check_rank, check_scale
from ..backend import check_name
from ..functional import splora_linear_trusted
from .adapter import LowRankAdapter
from .channel_masked import ChannelMasked, held_tensor

DEFAULT_RANK = 16
DEFAULT_INIT_RANGE = 1e-4


def _is_sp_adapters_splora_linear(module: nn.Module) -> bool:
    # An sp_adapters layer can only exist if sp_adapters is imported, so looking
    # in sys.modules avoids importing that library (and torch_pruning) ourselves.
    sp_adapters = sys.modules.get("sp_adapters")
    return sp_adapters is not None and isinstance(module, sp_adapters.SPLoRALinear)


def _check_backend(backend: str | None) -> str | None:
    return None if backend is None else check_name(backend)


def _plain_linear(weight: Tensor, bias: Tensor | None, training: bool) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight``/``bias`` without initialising a throwaway weight."""
    with warnings.catch_warnings():  # nn.Linear warns when it initialises a 0-channel weight
        warnings.simplefilter("ignore")
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight)
    if bias is not None:
        linear.bias = nn.Parameter(bias)
    return linear.train(training)


class SPLoRALinear(ChannelMasked, nn.Linear):
    r"""Channel-masked linear layer with a frozen weight and a low-rank adapter (SPLoRA).

    .. math::
        y_{\dots,o} = b_o + \sum_{i \in S} x_{\dots,i}\,(W_{o,i} + s\,(BA)_{o,i})
        \quad (o \in O), \qquad y_{\dots,o} = 0 \quad (o \notin O)

    with ``S``/``O`` the active input/output channels (``in_mask``/``out_mask``).
    Only the active block is computed (``|O|·|S|`` work, never ``out·in``).

    Args:
        in_features, out_features, bias, device, dtype: as :class:`torch.nn.Linear`.
        rank: adapter rank ``r``; a float below 1 is a fraction of ``out_features``
            (rounded, as in sp_adapters).  Keyword-only, because sp_adapters and
            torch disagree on the fourth positional argument.
        init_range: ``B`` starts uniform in ``±init_range`` (``None``/0: Kaiming).
        scale: adapter scale ``s``.
        backend: kernel backend (``None`` = auto), see :func:`spa_kernels.use_backend`.

    Parameters and buffers (state-dict keys of sp_adapters 0.7.1, plus the masks):
        weight: ``(out, in)``, ``requires_grad=False``.  Setting it to True gives
            masked fine-tuning: its gradient covers the active block only.
        bias: ``(out,)`` or ``None``.
        adapter.rows: ``(1, r, in)`` = ``A``.   adapter.cols: ``(1, out, r)`` = ``B``.
        in_mask: bool ``(in,)``.   out_mask: bool ``(out,)``.  All True initially.

    Shapes: input ``(..., in)`` → output ``(..., out)``, exactly zero at pruned outputs.

    State dicts: one saved by ``sp_adapters.SPLoRALinear`` loads with ``strict=True``
    (absent masks mean all channels active).  One saved here loads into sp_adapters
    with ``strict=False``; its ``unexpected_keys`` are exactly ``in_mask`` and
    ``out_mask``, which sp_adapters cannot represent (use :meth:`to_module` to hand
    a pruned layer to code that knows no masks).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        rank: int | float = DEFAULT_RANK,
        init_range: float | None = DEFAULT_INIT_RANGE,
        scale: float = 1.0,
        backend: str | None = None,
    ) -> None:
        # nn.Linear.__init__ would create a trainable weight and initialise it before
        # the adapter exists; build the same attributes directly instead.
        nn.Module.__init__(self)
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.scale = check_scale(scale)
        self.backend = _check_backend(backend)
        resolved_rank = check_rank(rank, out_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.adapter = LowRankAdapter(in_features, out_features, resolved_rank, init_range, **factory)
        self._init_masks(in_features, out_features, self.weight.device)
        self.reset_parameters()

    @property
    def rank(self) -> int:
        return self.adapter.rank

    def reset_parameters(self) -> None:
        """Adapter first, then weight and bias like ``nn.Linear``.

        This is sp_adapters' order, so equal seeds give equal layers in both libraries.
        """
        self.adapter.reset_parameters()
        nn.Linear.reset_parameters(self)

    def forward(self, input: Tensor) -> Tensor:
        lora_a, lora_b = self._modules["adapter"].factors()
        return splora_linear_trusted(
            input, held_tensor(self, "weight"), lora_a, lora_b, held_tensor(self, "bias"),
            self.in_idx, self.out_idx, self.scale, self.backend, self.compact_input, self.compact_output,
        )

    # ------------------------------------------------------------------ conversion

    @classmethod
    def from_module(
        cls,
        module: nn.Linear,
        rank: int | float = DEFAULT_RANK,
        init_range: float | None = DEFAULT_INIT_RANGE,
        *,
        scale: float = 1.0,
        backend: str | None = None,
    ) -> SPLoRALinear:
        """Wrap a trained layer: copy its weight (frozen) and bias, keep its device and dtype.

        Args:
            module: an ``nn.Linear`` (gets a fresh adapter of ``rank``), or an
                ``sp_adapters.SPLoRALinear`` / ``SPLoRALinear`` whose adapter is copied
                too (``rank`` and ``init_range`` are then ignored; masks are copied
                from an ``SPLoRALinear``).  Other ``nn.Linear`` subclasses are read
                as plain ``nn.Linear``: weight and bias only.
            rank, init_range, scale, backend: as the constructor.
        """
        if not isinstance(module, nn.Linear):
            raise TypeError(f"module must be an nn.Linear or an SPLoRA linear layer, got {type(module).__name__}")
        if isinstance(module.weight, nn.parameter.UninitializedParameter):
            raise ValueError("module has uninitialised (lazy) parameters; run one forward pass first")
        source_adapter = None
        if isinstance(module, SPLoRALinear) or _is_sp_adapters_splora_linear(module):
            source_adapter = module.adapter
            rank = source_adapter.rows.shape[1]
        layer = cls(
            module.in_features, module.out_features, module.bias is not None,
            device=module.weight.device, dtype=module.weight.dtype,
            rank=rank, init_range=init_range, scale=scale, backend=backend,
        )
        with torch.no_grad():
            layer.weight.copy_(module.weight)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
            if source_adapter is not None:
                layer.adapter.rows.copy_(source_adapter.rows)
                layer.adapter.cols.copy_(source_adapter.cols)
        if isinstance(module, SPLoRALinear):
            layer.set_masks(module.in_mask, module.out_mask)
        return layer.train(module.training)

    @torch.no_grad()
    def _merged_active_block(self) -> Tensor:
        """``W_OS + s·B_O A_S``, ``(|O|, |S|)``, gathered without a larger temporary."""
        rows, cols, weight = self.adapter.rows[0], self.adapter.cols[0], self.weight
        in_idx, out_idx = self.in_idx, self.out_idx
        if out_idx is not None:
            cols = cols.index_select(0, out_idx)
        if in_idx is not None:
            rows = rows.index_select(1, in_idx)
        if in_idx is not None and out_idx is not None:
            weight = weight[out_idx.unsqueeze(1), in_idx]  # both at once: no |O|×in step
        elif out_idx is not None:
            weight = weight.index_select(0, out_idx)
        elif in_idx is not None:
            weight = weight.index_select(1, in_idx)
        return torch.addmm(weight, cols, rows, alpha=self.scale)

    @torch.no_grad()
    def to_module(self) -> nn.Linear:
        """The merged full-size layer: ``nn.Linear(in, out)`` with ``to_module()(x) == self(x)``.

        Its weight is ``W + s·B A`` on the active block ``O × S`` and zero elsewhere
        (pruned output rows and pruned input columns); its bias is ``b`` on ``O`` and
        zero elsewhere.  No tensor larger than the ``(out, in)`` result is built.
        """
        block = self._merged_active_block()
        in_idx, out_idx = self.in_idx, self.out_idx
        if in_idx is None and out_idx is None:
            weight = block
        else:
            weight = self.weight.new_zeros(self.out_features, self.in_features)
            if in_idx is None:
                weight.index_copy_(0, out_idx, block)
            elif out_idx is None:
                weight.index_copy_(1, in_idx, block)
            else:
                weight[out_idx.unsqueeze(1), in_idx] = block
        bias = None
        if self.bias is not None:
            bias = self.bias.detach().clone()
            if out_idx is not None:
                bias = torch.zeros_like(bias).index_copy_(0, out_idx, bias.index_select(0, out_idx))
        return _plain_linear(weight, bias, self.training)

    @torch.no_grad()
    def compact(self) -> nn.Linear:
        """The physically smaller layer ``nn.Linear(|S|, |O|)`` of the active channels.

        Weight ``W_OS + s·B_O A_S``, bias ``b_O``, so that
        ``compact()(x[..., S]) == self(x)[..., O]`` with ``S``/``O`` the True positions
        of ``in_mask``/``out_mask``.  No tensor larger than the result is built.
        """
        bias = None
        if self.bias is not None:
            bias = self.bias.detach()
            bias = bias.clone() if self.out_idx is None else bias.index_select(0, self.out_idx)
        return _plain_linear(self._merged_active_block(), bias, self.training)

    def extra_repr(self) -> str:
        active_in = self.in_features if self.in_idx is None else self.in_idx.numel()
        active_out = self.out_features if self.out_idx is None else self.out_idx.numel()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, rank={self.rank}, scale={self.scale}, "
            f"active_in={active_in}, active_out={active_out}"
        )
