"""``PrunedHeadsAttention``: plain multi-head attention holding only the heads that were kept.

``nn.MultiheadAttention`` ties its width to its head count (``embed_dim = num_heads ·
head_dim``), so an attention layer with pruned heads merges into it only at full size,
the pruned heads' rows and columns zero.  This module is the physically smaller layer:
q/k/v projections ``embed_dim|kdim|vdim → kept·head_dim``, an out projection back to
``embed_dim``, and the kept heads computed at their unpruned width (scores scaled by
``1/sqrt(head_dim)``), so its output is the pruned layer's.  It takes
``nn.MultiheadAttention``'s forward arguments and returns what it returns, and so
stands where one stood, inside torch's transformer layers too.
:func:`spa_kernels.compact` makes one of every :class:`SPLoRAMultiheadAttention` with
pruned heads (:meth:`PrunedHeadsAttention.from_module`).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .attention import SPLoRAMultiheadAttention, _positive_int
from .attention_core import additive_masks, attend, check_attention_inputs, mean_over_heads, with_batch_dim


def _kept_heads(kept_heads: Tensor | Sequence[int], num_heads: int, device) -> Tensor:
    if isinstance(kept_heads, Tensor):
        if kept_heads.dtype == torch.bool or kept_heads.is_floating_point() or kept_heads.is_complex():
            raise TypeError(f"kept_heads must hold head indices (integers), got dtype {kept_heads.dtype}")
        heads = kept_heads.detach().to("cpu", torch.int64)
    else:
        values = list(kept_heads)
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in values):
            raise TypeError(f"kept_heads must hold head indices (integers), got {values!r}")
        heads = torch.tensor(values, dtype=torch.int64)
    if heads.dim() != 1:
        raise ValueError(f"kept_heads must be 1-D, got shape {tuple(heads.shape)}")
    if heads.numel() and (heads.min() < 0 or heads.max() >= num_heads):
        raise ValueError(f"kept_heads must lie in [0, {num_heads}), got {heads.tolist()}")
    if heads.numel() > 1 and not bool((heads[1:] > heads[:-1]).all()):
        raise ValueError(f"kept_heads must be strictly increasing, got {heads.tolist()}")
    return heads.to(device)


class PrunedHeadsAttention(nn.Module):
    r"""Multi-head attention over the kept heads of a wider layer, in plain torch layers.

    .. math::
        \mathrm{out} = W_o\,[\mathrm{head}_h]_{h \in \mathcal{K}} + b_o, \qquad
        \mathrm{head}_h = \mathrm{softmax}\Big(\frac{q_h k_h^\top}{\sqrt{d}} + M\Big) v_h

    with ``d = embed_dim / num_heads`` the unpruned head width and ``K`` the kept heads:
    the output of ``nn.MultiheadAttention(embed_dim, num_heads)`` whose other heads are
    zeroed.

    Args:
        embed_dim, num_heads: the unpruned layer's (``num_heads`` divides ``embed_dim``).
        kept_heads: indices of the kept heads, strictly increasing (may be empty).
        dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first, device, dtype:
            as :class:`torch.nn.MultiheadAttention`.

    Attributes:
        num_heads: the heads it computes, ``len(kept_heads)`` (as on the torch module,
            the count of heads in its projections).
        unpruned_num_heads: the constructor's ``num_heads``.
        head_dim: ``embed_dim // unpruned_num_heads``.
        kept_heads: int64 buffer of the kept heads' indices in the unpruned layer.
        q_proj, k_proj, v_proj: ``nn.Linear`` ``embed_dim|kdim|vdim → num_heads·head_dim``,
            head ``i`` (unpruned head ``kept_heads[i]``) at rows ``i·head_dim ...``.
        out_proj: ``nn.Linear`` ``num_heads·head_dim → embed_dim``.
        bias_k, bias_v: ``(1, 1, num_heads·head_dim)`` with ``add_bias_kv``, else None.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kept_heads: Tensor | Sequence[int],
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        embed_dim = _positive_int(embed_dim, "embed_dim")
        num_heads = _positive_int(num_heads, "num_heads")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("kept_heads", _kept_heads(kept_heads, num_heads, device))
        self.embed_dim = embed_dim
        self.kdim = embed_dim if kdim is None else _positive_int(kdim, "kdim")
        self.vdim = embed_dim if vdim is None else _positive_int(vdim, "vdim")
        self.unpruned_num_heads = num_heads
        self.num_heads = self.kept_heads.numel()
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self.add_zero_attn = bool(add_zero_attn)
        # torch's TransformerEncoderLayer/Encoder read these to choose a fused kernel that
        # takes in_proj_weight; False/None make them call this module instead.
        self._qkv_same_embed_dim = False
        self.in_proj_weight = None
        self.in_proj_bias = None
        width = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, width, bias, **factory)
        self.k_proj = nn.Linear(self.kdim, width, bias, **factory)
        self.v_proj = nn.Linear(self.vdim, width, bias, **factory)
        self.out_proj = nn.Linear(width, embed_dim, bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, width, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, width, **factory))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:  # torch's initialisation of the same parameters
        for projection in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(projection.weight)
            if projection.bias is not None:
                nn.init.zeros_(projection.bias)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    @classmethod
    @torch.no_grad()
    def from_module(cls, module: nn.Module, kept_heads: Tensor | Sequence[int] | None = None) -> PrunedHeadsAttention:
        """The kept heads of an attention layer, as a layer of their own.

        Args:
            module: an ``nn.MultiheadAttention``, or an :class:`SPLoRAMultiheadAttention`
                (merged first: ``W + s·B A`` with its channel masks applied).
            kept_heads: the heads to keep, strictly increasing; by default the active
                heads (``head_mask``) of an :class:`SPLoRAMultiheadAttention`; required
                for an ``nn.MultiheadAttention``.

        Returns:
            A layer on ``module``'s device and dtype, in its training mode, whose output
            equals ``module``'s with every other head's output zeroed.
        """
        if isinstance(module, SPLoRAMultiheadAttention):
            if kept_heads is None:
                kept_heads = module.head_mask.nonzero().flatten()
            module = module.to_module()
        elif not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"module must be an nn.MultiheadAttention or an SPLoRAMultiheadAttention, "
                            f"got {type(module).__name__}")
        elif kept_heads is None:
            raise ValueError("kept_heads must be given for an nn.MultiheadAttention (it has no head mask)")
        reference = module.out_proj.weight
        layer = cls(
            module.embed_dim, module.num_heads, kept_heads, module.dropout, module.in_proj_bias is not None,
            module.bias_k is not None, module.add_zero_attn, kdim=module.kdim, vdim=module.vdim,
            batch_first=module.batch_first, device=reference.device, dtype=reference.dtype,
        )
        d = layer.head_dim
        rows = (layer.kept_heads.unsqueeze(1) * d + torch.arange(d, device=reference.device)).flatten()
        if module._qkv_same_embed_dim:
            weights = module.in_proj_weight.chunk(3)
        else:
            weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        biases = (None,) * 3 if module.in_proj_bias is None else module.in_proj_bias.chunk(3)
        for target, weight, bias in zip((layer.q_proj, layer.k_proj, layer.v_proj), weights, biases, strict=True):
            target.weight.copy_(weight.index_select(0, rows))
            if bias is not None:
                target.bias.copy_(bias.index_select(0, rows))
        layer.out_proj.weight.copy_(module.out_proj.weight.index_select(1, rows))
        if module.out_proj.bias is not None:
            layer.out_proj.bias.copy_(module.out_proj.bias)
        if module.bias_k is not None:
            layer.bias_k.copy_(module.bias_k.index_select(2, rows))
            layer.bias_v.copy_(module.bias_v.index_select(2, rows))
        return layer.train(module.training)

    def _split_heads(self, projected: Tensor) -> Tensor:
        """``(N, T, num_heads·head_dim)`` → ``(N, num_heads, T, head_dim)``."""
        return projected.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def _append_extra_keys(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        batch = key.shape[0]
        shape = (batch, self.num_heads, 1, self.head_dim)
        if self.bias_k is not None:
            extra_key = self.bias_k.view(self.num_heads, 1, self.head_dim).to(key.dtype).expand(shape)
            extra_value = self.bias_v.view(self.num_heads, 1, self.head_dim).to(value.dtype).expand(shape)
            key, value = torch.cat([key, extra_key], dim=2), torch.cat([value, extra_value], dim=2)
        if self.add_zero_attn:
            key, value = torch.cat([key, key.new_zeros(shape)], dim=2), torch.cat([value, value.new_zeros(shape)], dim=2)
        return key, value

    def _head_planes(self, attn_mask: Tensor | None, batch: int, target: int, source: int) -> Tensor | None:
        """The additive ``attn_mask`` as ``(N|1, heads|1, L, S)`` planes of the kept heads, or None."""
        if attn_mask is None or attn_mask.dim() == 2:
            return None if attn_mask is None else attn_mask.view(1, 1, target, source)
        if attn_mask.shape[0] == batch * self.num_heads:
            return attn_mask.view(batch, self.num_heads, target, source)
        # one plane per head of the unpruned layer: the kept heads' planes
        return attn_mask.view(batch, self.unpruned_num_heads, target, source).index_select(1, self.kept_heads)

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
        r"""As :meth:`torch.nn.MultiheadAttention.forward`, over the kept heads.

        Shapes: query ``(L, N, E)`` (``(N, L, E)`` with ``batch_first``, ``(L, E)``
        unbatched), key/value ``(S, N, kdim|vdim)`` likewise; ``key_padding_mask``
        ``(N, S)``/``(S,)``; ``attn_mask`` ``(L, S)``, or ``(N·h, L, S)`` with ``h`` the
        unpruned layer's head count (the kept heads' planes are used) or ``num_heads``.
        Bool masks are True where attending is not allowed, float masks are added to the
        scores; ``is_causal`` is a hint that ``attn_mask`` is the causal mask, as in torch.

        Returns:
            ``(output, weights)``: ``output`` like ``query`` with ``E`` features;
            ``weights`` ``None`` unless ``need_weights``: ``(N, num_heads, L, S)`` per
            kept head (``average_attn_weights=False``), else their mean ``(N, L, S)``
            (zeros if no head is kept).  Unbatched input drops ``N``.
        """
        mask_heads = (self.unpruned_num_heads, self.num_heads)
        batched = check_attention_inputs(self, query, key, value, key_padding_mask, attn_mask, mask_heads)
        query, key, value, key_padding_mask = with_batch_dim(batched, query, key, value, key_padding_mask)
        if batched and not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)

        q, k, v = self._split_heads(self.q_proj(query)), self._split_heads(self.k_proj(key)), self._split_heads(self.v_proj(value))
        batch, _, target, _ = q.shape
        source = k.shape[2]
        k, v = self._append_extra_keys(k, v)
        # Masks in the projections' dtype (lower than the input's under autocast), as the core needs.
        key_padding_mask, attn_mask, causal_core = additive_masks(key_padding_mask, attn_mask, is_causal,
                                                                  need_weights, q.dtype)
        attn_mask = self._head_planes(attn_mask, batch, target, source)
        dropout = self.dropout if self.training else 0.0
        heads_out, weights = attend(q, k, v, attn_mask, key_padding_mask, source, dropout, causal=causal_core,
                                    need_weights=need_weights, batch_first=self.batch_first or not batched)
        output = self.out_proj(heads_out.reshape(*heads_out.shape[:2], self.num_heads * self.head_dim))
        if not batched:
            output = output.squeeze(0)
        if need_weights:
            if average_attn_weights:
                weights = mean_over_heads(weights)
            if not batched:
                weights = weights.squeeze(0)
        return output, weights

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads} (kept of {self.unpruned_num_heads}: "
            f"{self.kept_heads.tolist()}), head_dim={self.head_dim}, kdim={self.kdim}, vdim={self.vdim}, "
            f"dropout={self.dropout}, batch_first={self.batch_first}"
        )


__all__ = ["PrunedHeadsAttention"]
