"""The attention computation shared by the SPLoRA and pruned-heads attention layers.

Both layers check their inputs, turn the masks additive and attend over ``(N, heads,
L, d)`` projections the same way; they differ in how they project and which heads
they hold.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def additive_mask(mask: Tensor | None, name: str, dtype: torch.dtype) -> Tensor | None:
    """A bool mask (True = may not attend) as ``0``/``-inf``; a float mask as it is."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor, got dtype {mask.dtype}")
    return mask.to(dtype)


def check_attention_inputs(
    owner: nn.Module, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
    attn_mask: Tensor | None, mask_heads: tuple[int, ...],
) -> bool:
    """Check an attention forward's inputs against ``owner``'s widths and layout; whether they are batched.

    ``owner`` has ``embed_dim``, ``kdim``, ``vdim`` and ``batch_first``; a 3-D ``attn_mask``
    may hold ``batch·h`` planes for any ``h`` in ``mask_heads``.
    """
    for tensor, name in ((query, "query"), (key, "key"), (value, "value")):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.is_nested:
            raise ValueError(f"{name} is a nested tensor, which {type(owner).__name__} does not accept")
    if query.dim() not in (2, 3):
        raise ValueError(f"query must be 2-D (unbatched) or 3-D (batched), got shape {tuple(query.shape)}")
    batched = query.dim() == 3
    for tensor, name, width in ((query, "query", owner.embed_dim), (key, "key", owner.kdim), (value, "value", owner.vdim)):
        if tensor.dim() != query.dim():
            raise ValueError(f"{name} must be {query.dim()}-D like query, got shape {tuple(tensor.shape)}")
        if tensor.shape[-1] != width:
            raise ValueError(f"{name} must have {width} features in its last dimension, got shape {tuple(tensor.shape)}")
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree in all but the last dimension")
    batch_dim = 0 if owner.batch_first else 1
    if batched and query.shape[batch_dim] != key.shape[batch_dim]:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} have different batch sizes")
    seq_dim = 1 - batch_dim if batched else 0
    target, source = query.shape[seq_dim], key.shape[seq_dim]
    batch = query.shape[batch_dim] if batched else 1
    if key_padding_mask is not None:
        expected = (batch, source) if batched else (source,)
        if not isinstance(key_padding_mask, Tensor) or tuple(key_padding_mask.shape) != expected:
            got = tuple(key_padding_mask.shape) if isinstance(key_padding_mask, Tensor) else key_padding_mask
            raise ValueError(f"key_padding_mask must have shape {expected}, got {got}")
    if attn_mask is not None:
        expected = ((target, source), *((batch * heads, target, source) for heads in dict.fromkeys(mask_heads)))
        if not isinstance(attn_mask, Tensor) or tuple(attn_mask.shape) not in expected:
            got = tuple(attn_mask.shape) if isinstance(attn_mask, Tensor) else attn_mask
            raise ValueError(f"attn_mask must have shape {' or '.join(map(str, expected))}, got {got}")
    return batched


def with_batch_dim(
    batched: bool, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Unbatched inputs with a leading batch dimension of one; batched ones as they are."""
    if batched:
        return query, key, value, key_padding_mask
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.unsqueeze(0)
    return query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), key_padding_mask


def additive_masks(
    key_padding_mask: Tensor | None, attn_mask: Tensor | None, is_causal: bool, need_weights: bool,
    dtype: torch.dtype,
) -> tuple[Tensor | None, Tensor | None, bool]:
    """``(key_padding_mask, attn_mask, causal_core)``: the masks additive in ``dtype``.

    ``causal_core``: the core may apply the causal mask itself (no padding mask, no
    weights to report), and then ``attn_mask`` is dropped.
    """
    if is_causal and attn_mask is None:
        raise ValueError("is_causal=True is a hint that attn_mask is causal; attn_mask must be given too")
    key_padding_mask = additive_mask(key_padding_mask, "key_padding_mask", dtype)
    causal_core = is_causal and key_padding_mask is None and not need_weights
    attn_mask = None if causal_core else additive_mask(attn_mask, "attn_mask", dtype)
    return key_padding_mask, attn_mask, causal_core


def attend(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None, source: int,
    dropout: float, *, causal: bool, need_weights: bool, batch_first: bool,
) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention of ``(N, heads, L, d)`` projections; ``(heads_out, weights)``.

    ``attn_mask``: the additive ``(N|1, heads|1, L, S)`` planes of the held heads, or
    None; ``key_padding_mask`` ``(N, S)`` is added to it.  Keys past the ``source``
    given ones (``bias_k``, the zero key) may always be attended.  ``heads_out`` comes
    back in the caller's layout, ``(N, L, heads, d)`` or ``(L, N, heads, d)``, in
    ``q``'s dtype; ``weights`` ``(N, heads, L, keys)`` when ``need_weights``, else None.
    """
    batch, heads, target, head_dim = q.shape
    keys = k.shape[2]
    mask = attn_mask
    if key_padding_mask is not None:
        padding = key_padding_mask.view(batch, 1, 1, source)
        mask = padding if mask is None else mask + padding
    if mask is not None and keys > source:
        mask = F.pad(mask, (0, keys - source))
    scale = 1.0 / math.sqrt(head_dim)

    weights = None
    if need_weights:
        scores = torch.matmul(q * scale, k.transpose(-2, -1))
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if dropout > 0.0:
            weights = F.dropout(weights, p=dropout)
        heads_out = torch.matmul(weights, v)
    elif heads == 0:  # nothing to attend with; the core's kernels may refuse empty heads
        heads_out = q.new_zeros(batch, 0, target, head_dim)
    else:
        heads_out = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal=causal, scale=scale)
    # (N, heads, L, d) -> the caller's layout, so that the output projection's input comes out contiguous.
    heads_out = heads_out.permute(0, 2, 1, 3) if batch_first else heads_out.permute(2, 0, 1, 3)
    return heads_out.to(q.dtype), weights  # autocast may run the core in a lower precision than the layers


def mean_over_heads(weights: Tensor) -> Tensor:
    """``(N, heads, L, S)`` → their mean ``(N, L, S)``; zeros when no head is held (nothing attends)."""
    if weights.shape[1] == 0:
        return weights.new_zeros(weights.shape[0], *weights.shape[2:])
    return weights.mean(dim=1)
