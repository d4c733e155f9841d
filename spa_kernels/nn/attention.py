"""``SPLoRAMultiheadAttention``: multi-head attention with SPLoRA projections and prunable heads."""

from __future__ import annotations

import numbers
import sys

import torch
from torch import Tensor, nn

from .._validation import check_mask
from .attention_core import additive_masks, attend, check_attention_inputs, mean_over_heads, with_batch_dim
from .channel_masked import indices_from_mask
from .linear import DEFAULT_INIT_RANGE, DEFAULT_RANK, SPLoRALinear

HEAD_MASK = "head_mask"


def _is_sp_adapters_attention(module: nn.Module) -> bool:
    sp_adapters = sys.modules.get("sp_adapters")  # see _is_sp_adapters_splora_linear
    return sp_adapters is not None and isinstance(module, sp_adapters.SPLoRAMultiheadAttention)


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


class SPLoRAMultiheadAttention(nn.Module):
    r"""Drop-in :class:`torch.nn.MultiheadAttention` whose projections are :class:`SPLoRALinear`.

    .. math::
        \mathrm{out} = W_o\big[\,\mathrm{head}_h \text{ for } h \in \mathcal{H}\,;\ 0 \text{ for } h \notin \mathcal{H}\big] + b_o,
        \qquad \mathrm{head}_h = \mathrm{softmax}\Big(\frac{q_h k_h^\top}{\sqrt{d}} + M\Big) v_h

    with ``q = q_proj(query) + b_q`` (likewise ``k``, ``v``), ``d = embed_dim / num_heads``
    the unpruned head width and ``H`` the active heads (``head_mask``).  A pruned head
    is the dense layer with that head's output removed: it contributes nothing, its
    q/k/v rows, in-projection bias, out-projection columns and adapter entries get no
    gradient, and it costs nothing (see :meth:`forward`).

    Args:
        embed_dim, num_heads, dropout, bias, kdim, vdim, batch_first, device, dtype:
            as :class:`torch.nn.MultiheadAttention`.
        add_bias_kv, add_zero_attn: as torch: a learned key/value (``bias_k``/``bias_v``,
            ``(1, 1, embed_dim)``), or a zero key/value, appended to every sequence.
        rank, init_range, scale, backend: as :class:`SPLoRALinear`, for all four projections.

    Parameters and buffers (the layout of ``sp_adapters.SPLoRAMultiheadAttention`` 0.7.1,
    plus masks):
        q_proj, k_proj, v_proj: :class:`SPLoRALinear` ``embed_dim|kdim|vdim → embed_dim``
            without bias; their biases are the three thirds of ``in_proj_bias``
            ``(3·embed_dim,)``.
        out_proj: :class:`SPLoRALinear` ``embed_dim → embed_dim``.
        head_mask: bool ``(num_heads,)``, True for active heads.

    State dicts: one saved by sp_adapters loads with ``strict=True`` (all heads and
    channels active); one saved here loads into sp_adapters with ``strict=False``, the
    mask buffers being its only ``unexpected_keys``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        rank: int | float = DEFAULT_RANK,
        init_range: float | None = DEFAULT_INIT_RANGE,
        scale: float = 1.0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        embed_dim = _positive_int(embed_dim, "embed_dim")
        num_heads = _positive_int(num_heads, "num_heads")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
        factory = {"device": device, "dtype": dtype}
        adapter = {"rank": rank, "init_range": init_range, "scale": scale, "backend": backend}
        self.embed_dim = embed_dim
        self.kdim = embed_dim if kdim is None else _positive_int(kdim, "kdim")
        self.vdim = embed_dim if vdim is None else _positive_int(vdim, "vdim")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        # torch's TransformerEncoderLayer/Encoder hand the whole layer to fused kernels that
        # read `in_proj_weight` when this is True; our q/k/v are separate layers, so it is False.
        self._qkv_same_embed_dim = False
        self.in_proj_weight = None
        self.add_zero_attn = bool(add_zero_attn)
        # Construction order and init are sp_adapters', so equal seeds give equal layers.
        self.q_proj = SPLoRALinear(embed_dim, embed_dim, False, **factory, **adapter)
        self.k_proj = SPLoRALinear(self.kdim, embed_dim, False, **factory, **adapter)
        self.v_proj = SPLoRALinear(self.vdim, embed_dim, False, **factory, **adapter)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = SPLoRALinear(embed_dim, embed_dim, bias, **factory, **adapter)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self.register_buffer(HEAD_MASK, torch.ones(num_heads, dtype=torch.bool, device=device))
        self.register_buffer("head_idx", None, persistent=False)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for projection in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(projection.weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    @property
    def rank(self) -> int:
        return self.q_proj.rank

    # ------------------------------------------------------------------ masks

    def set_masks(
        self,
        head_mask: Tensor | None = None,
        in_mask: Tensor | None = None,
        out_mask: Tensor | None = None,
        *,
        key_in_mask: Tensor | None = None,
        value_in_mask: Tensor | None = None,
    ) -> None:
        """Set the active heads and embedding channels; ``None`` keeps a mask as it is.

        Args:
            head_mask: bool ``(num_heads,)``, True for active heads.  Sets the output
                masks of q/k/v_proj and the input mask of out_proj to the active
                heads' channels (replacing any finer channel masks set on them).
            in_mask: bool ``(embed_dim,)``, active input channels of the query; also of
                the key and value (the self-attention case, one stream) where
                ``kdim``/``vdim`` equal ``embed_dim`` and no separate mask is given.
            out_mask: bool ``(embed_dim,)``, active output channels of out_proj.
            key_in_mask: bool ``(kdim,)``, active input channels of the key.
            value_in_mask: bool ``(vdim,)``, active input channels of the value.

        Raises:
            TypeError: a mask is not a bool tensor.   ValueError: wrong shape.

        Every mask is checked before any is changed.  Index lists are rebuilt here,
        once (one host sync), never in ``forward``.
        """
        checks = (
            (head_mask, HEAD_MASK, self.num_heads),
            (in_mask, "in_mask", self.embed_dim),
            (out_mask, "out_mask", self.embed_dim),
            (key_in_mask, "key_in_mask", self.kdim),
            (value_in_mask, "value_in_mask", self.vdim),
        )
        for mask, name, size in checks:
            if mask is not None:
                check_mask(mask, name, size)
        if in_mask is not None:
            if key_in_mask is None and self.kdim == self.embed_dim:
                key_in_mask = in_mask
            if value_in_mask is None and self.vdim == self.embed_dim:
                value_in_mask = in_mask
        if head_mask is not None:
            with torch.no_grad():
                self.head_mask.copy_(head_mask)
            channels = self.head_mask.repeat_interleave(self.head_dim)
            for projection in (self.q_proj, self.k_proj, self.v_proj):
                projection.set_masks(out_mask=channels)
            self.out_proj.set_masks(in_mask=channels)
        self.q_proj.set_masks(in_mask=in_mask)
        self.k_proj.set_masks(in_mask=key_in_mask)
        self.v_proj.set_masks(in_mask=value_in_mask)
        self.out_proj.set_masks(out_mask=out_mask)
        self.head_idx = indices_from_mask(self.head_mask)

    def refresh_indices(self) -> None:
        """Rebuild the active-head index list after ``head_mask`` was written in place (``load_task``)."""
        self.head_idx = indices_from_mask(self.head_mask)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # sp_adapters checkpoints have no head mask: every head is active.
        absent = prefix + HEAD_MASK not in state_dict
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        device = self.q_proj.weight.device
        if absent:
            if prefix + HEAD_MASK in missing_keys:
                missing_keys.remove(prefix + HEAD_MASK)
            if self.head_mask.device == device:
                self.head_mask.fill_(True)
            else:  # a meta-device module loaded with assign=True
                self.head_mask = torch.ones(self.num_heads, dtype=torch.bool, device=device)
        if self.head_mask.dtype != torch.bool:
            self.head_mask = self.head_mask != 0
        self.head_idx = indices_from_mask(self.head_mask)

    # ------------------------------------------------------------------ forward

    def _heads(self, projected: Tensor, bias: Tensor | None, out_mask: Tensor, out_idx: Tensor | None) -> Tensor:
        """``(N, T, embed_dim)`` projection → ``(N, active heads, T, head_dim)`` plus bias.

        The SPLoRALinear writes the full width with zeros at pruned heads (a memset; its
        GEMM covers the active rows only), and the active heads are then gathered once.
        A compact output straight from the op would save the memset and this copy, but a
        layer's output is full width by contract, and calling the layer itself (not its
        op) keeps its hooks (pruning criteria, FLOP accounting) working.  The copy costs
        ``O(tokens·active)`` against the ``O(tokens·active·in)`` GEMM.  The bias is added
        to the gathered heads, so a pruned head's bias is never read.
        """
        heads = projected.unflatten(-1, (self.num_heads, self.head_dim))
        if bias is not None and out_idx is not None:  # channels pruned inside active heads stay zero
            bias = bias * out_mask
        if self.head_idx is None:
            return (heads if bias is None else heads + bias.view(self.num_heads, self.head_dim)).transpose(1, 2)
        heads = heads.index_select(2, self.head_idx)
        if bias is not None:  # in place: the gather made a fresh tensor, which its backward does not need
            heads = heads.add_(self._active_heads_of(bias))
        return heads.transpose(1, 2)

    def _active_heads_of(self, per_channel: Tensor) -> Tensor:
        """``(embed_dim,)``-shaped values → ``(active heads, head_dim)``."""
        per_head = per_channel.reshape(self.num_heads, self.head_dim)
        return per_head if self.head_idx is None else per_head.index_select(0, self.head_idx)

    def _append_extra_keys(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """``bias_k``/``bias_v`` and the zero key/value appended to ``(N, heads, S, d)``."""
        batch, heads, _, _ = key.shape
        if self.bias_k is not None:
            extra_key = self._active_heads_of(self.bias_k).unsqueeze(1).expand(batch, heads, 1, self.head_dim)
            extra_value = self._active_heads_of(self.bias_v).unsqueeze(1).expand(batch, heads, 1, self.head_dim)
            key, value = torch.cat([key, extra_key], dim=2), torch.cat([value, extra_value], dim=2)
        if self.add_zero_attn:
            zeros = key.new_zeros(batch, heads, 1, self.head_dim)
            key, value = torch.cat([key, zeros], dim=2), torch.cat([value, zeros], dim=2)
        return key, value

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        r"""As :meth:`torch.nn.MultiheadAttention.forward`, over the active heads only.

        Shapes: query ``(L, N, E)`` (``(N, L, E)`` with ``batch_first``, ``(L, E)``
        unbatched), key/value ``(S, N, kdim|vdim)`` likewise; ``key_padding_mask``
        ``(N, S)``/``(S,)``; ``attn_mask`` ``(L, S)`` or ``(N·num_heads, L, S)``; bool
        masks are True where attending is not allowed, float masks are added to the
        scores.  ``is_causal`` is a hint that ``attn_mask`` is the causal mask, as in torch.

        The scores, softmax and weighted sum run on the active heads only:
        :func:`torch.nn.functional.scaled_dot_product_attention` when
        ``need_weights=False``, an explicit softmax otherwise.

        Returns:
            ``(output, weights)``: ``output`` like ``query`` with ``E`` features;
            ``weights`` ``None`` unless ``need_weights``.  Per head
            (``average_attn_weights=False``): ``(N, num_heads, L, S)`` with zeros at
            pruned heads (a removed head attends nowhere).  Averaged: ``(N, L, S)``, the
            mean over the *active* heads, so each row still sums to one, exactly what
            the model with the pruned heads physically removed returns (zeros if every
            head is pruned).  Unbatched input drops ``N``.
        """
        batched = check_attention_inputs(self, query, key, value, key_padding_mask, attn_mask, (self.num_heads,))
        query, key, value, key_padding_mask = with_batch_dim(batched, query, key, value, key_padding_mask)
        batch_first = self.batch_first or not batched
        key_padding_mask, attn_mask, causal_core = additive_masks(key_padding_mask, attn_mask, is_causal,
                                                                  need_weights, query.dtype)

        bias_q = bias_k = bias_v = None
        if self.in_proj_bias is not None:
            bias_q, bias_k, bias_v = self.in_proj_bias.chunk(3)
        projections = (
            (self.q_proj, query, bias_q), (self.k_proj, key, bias_k), (self.v_proj, value, bias_v),
        )
        q, k, v = (
            self._heads(layer(x) if batch_first else layer(x).transpose(0, 1), bias, layer.out_mask, layer.out_idx)
            for layer, x, bias in projections
        )
        batch, _, target, _ = q.shape
        source = k.shape[2]
        k, v = self._append_extra_keys(k, v)

        if attn_mask is not None:
            if attn_mask.dim() == 2:
                attn_mask = attn_mask.view(1, 1, target, source)
            else:
                attn_mask = attn_mask.view(batch, self.num_heads, target, source)
                if self.head_idx is not None:
                    attn_mask = attn_mask.index_select(1, self.head_idx)
        dropout = self.dropout if self.training else 0.0
        heads_out, weights = attend(q, k, v, attn_mask, key_padding_mask, source, dropout, causal=causal_core,
                                    need_weights=need_weights, batch_first=batch_first)

        # Full width with zeros at pruned heads (out_proj's in index list skips them, but its
        # input must be embed_dim wide).
        if self.head_idx is not None:
            full = heads_out.new_zeros(*heads_out.shape[:2], self.num_heads, self.head_dim)
            heads_out = full.index_copy(2, self.head_idx, heads_out)
        output = self.out_proj(heads_out.reshape(*heads_out.shape[:2], self.embed_dim))
        if not batched:
            output = output.squeeze(0)

        if need_weights:
            weights = self._report_weights(weights, average_attn_weights)
            if not batched:
                weights = weights.squeeze(0)
        return output, weights

    def _report_weights(self, weights: Tensor, average: bool) -> Tensor:
        """``(N, active heads, L, S)`` → per head with zeros at pruned heads, or the active heads' mean."""
        if average:
            return mean_over_heads(weights)
        if self.head_idx is None:
            return weights
        full = weights.new_zeros(weights.shape[0], self.num_heads, *weights.shape[2:])
        return full.index_copy(1, self.head_idx, weights)

    # ------------------------------------------------------------------ conversion

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        rank: int | float = DEFAULT_RANK,
        init_range: float | None = DEFAULT_INIT_RANGE,
        *,
        scale: float = 1.0,
        backend: str | None = None,
    ) -> SPLoRAMultiheadAttention:
        """Wrap a trained attention layer: copy its weights (frozen) and biases.

        Args:
            module: an ``nn.MultiheadAttention`` (fresh adapters of ``rank``), or an
                ``sp_adapters.SPLoRAMultiheadAttention`` / ``SPLoRAMultiheadAttention``
                whose adapters are copied too (``rank`` and ``init_range`` are then
                ignored; masks are copied from an ``SPLoRAMultiheadAttention``).
            rank, init_range, scale, backend: as the constructor.
        """
        ours = isinstance(module, SPLoRAMultiheadAttention)
        adapted = ours or _is_sp_adapters_attention(module)
        if not (ours or isinstance(module, nn.MultiheadAttention)):
            raise TypeError(
                f"module must be an nn.MultiheadAttention or an SPLoRA attention layer, got {type(module).__name__}"
            )
        reference = module.out_proj.weight
        if adapted:
            rank = module.q_proj.adapter.rows.shape[1]
        layer = cls(
            module.embed_dim, module.num_heads, module.dropout, module.in_proj_bias is not None,
            module.bias_k is not None, module.add_zero_attn, kdim=module.kdim, vdim=module.vdim, batch_first=module.batch_first,
            device=reference.device, dtype=reference.dtype,
            rank=rank, init_range=init_range, scale=scale, backend=backend,
        )
        names = ("q_proj", "k_proj", "v_proj", "out_proj")
        with torch.no_grad():
            if adapted:
                for name in names:
                    source, target = getattr(module, name), getattr(layer, name)
                    target.weight.copy_(source.weight)
                    target.adapter.rows.copy_(source.adapter.rows)
                    target.adapter.cols.copy_(source.adapter.cols)
            else:
                if module._qkv_same_embed_dim:
                    weights = module.in_proj_weight.chunk(3)
                else:
                    weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
                for target, weight in zip((layer.q_proj, layer.k_proj, layer.v_proj), weights, strict=True):
                    target.weight.copy_(weight)
                layer.out_proj.weight.copy_(module.out_proj.weight)
            if module.in_proj_bias is not None:
                layer.in_proj_bias.copy_(module.in_proj_bias)
            if module.out_proj.bias is not None:
                layer.out_proj.bias.copy_(module.out_proj.bias)
            if module.bias_k is not None:
                layer.bias_k.copy_(module.bias_k)
                layer.bias_v.copy_(module.bias_v)
        if ours:
            for name in names:
                source = getattr(module, name)
                getattr(layer, name).set_masks(source.in_mask, source.out_mask)
            with torch.no_grad():
                layer.head_mask.copy_(module.head_mask)
            layer.head_idx = indices_from_mask(layer.head_mask)
        return layer.train(module.training)

    @torch.no_grad()
    def to_module(self) -> nn.MultiheadAttention:
        """The merged full-size ``nn.MultiheadAttention`` with the same output.

        Each projection weight is ``W + s·B A``, zero at pruned channels and at pruned
        heads' rows (q/k/v) and columns (out_proj); biases are zero there too.  Its
        attention *weights* differ at pruned heads (it computes them; this layer
        reports zeros) and so does their average, unless no head is pruned.
        :class:`~spa_kernels.nn.PrunedHeadsAttention` ``.from_module(self)`` holds the
        active heads only.
        """
        head_channels = self.head_mask.repeat_interleave(self.head_dim)
        merged = []
        for projection in (self.q_proj, self.k_proj, self.v_proj):
            weight = projection.to_module().weight.detach()
            merged.append(weight * head_channels.unsqueeze(1).to(weight.dtype))
        out_proj = self.out_proj.to_module()
        reference = self.q_proj.weight
        module = nn.MultiheadAttention(
            self.embed_dim, self.num_heads, self.dropout, self.in_proj_bias is not None,
            self.bias_k is not None, self.add_zero_attn, kdim=self.kdim, vdim=self.vdim, batch_first=self.batch_first,
            device=reference.device, dtype=reference.dtype,
        )
        if module._qkv_same_embed_dim:
            module.in_proj_weight.copy_(torch.cat(merged))
        else:
            for weight, name in zip(merged, ("q_proj_weight", "k_proj_weight", "v_proj_weight"), strict=True):
                getattr(module, name).copy_(weight)
        module.out_proj.weight.copy_(out_proj.weight * head_channels.to(reference.dtype))
        if self.in_proj_bias is not None:
            active = torch.cat([p.out_mask & head_channels for p in (self.q_proj, self.k_proj, self.v_proj)])
            module.in_proj_bias.copy_(self.in_proj_bias * active.to(reference.dtype))
            module.out_proj.bias.copy_(out_proj.bias)
        if self.bias_k is not None:  # a pruned head's bias_v would otherwise reach its output
            module.bias_k.copy_(self.bias_k * head_channels.to(reference.dtype))
            module.bias_v.copy_(self.bias_v * head_channels.to(reference.dtype))
        return module.train(self.training)

    def extra_repr(self) -> str:
        active_heads = self.num_heads if self.head_idx is None else self.head_idx.numel()
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, vdim={self.vdim}, "
            f"dropout={self.dropout}, batch_first={self.batch_first}, rank={self.rank}, active_heads={active_heads}"
        )
