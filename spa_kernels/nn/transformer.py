"""Torch transformer containers that always compute through their children.

In inference (eval mode, no autograd, ``batch_first``, ...) ``nn.TransformerEncoderLayer``
and ``nn.TransformerEncoder`` skip their children: they read ``linear1.weight``,
``linear2.weight``, ``self_attn.in_proj_weight``, ... themselves and call one fused
native kernel for the whole layer (the encoder also packs the batch into a nested
tensor first).  An SPA layer among those children would never run, and the model
would silently evaluate as its unadapted, unpruned base.

Why the fix sits here, on the container, and not elsewhere:

- The shortcut is taken by the container's ``forward``; the SPA layer is never called,
  so nothing it does can take part.  Giving SPA weights a tensor subclass whose
  ``__torch_function__`` makes the fast-path check fail would work only while that
  check exists, and would slow every op on every weight.
- Switching the fast path off process-wide (``torch.backends.mha.set_fastpath_enabled``)
  would slow unrelated, unconverted models and can be switched back on by anyone.
- A forward hook also turns the layer's fast path off, but the encoder's nested-tensor
  path ignores hooks, and a hook is removed as easily as it is added.

So ``convert`` gives each such container holding an SPA layer the subclass below
(its ``__class__`` is rebound: state-dict keys, ``isinstance`` checks and pickling
stay as they were).  The subclass's ``forward`` is the composed computation that
PyTorch runs outside inference, calling each child; it reads no attention internals,
so it keeps working when ``self_attn`` is replaced by a module without
``in_proj_weight``.  An unconverted ``nn.MultiheadAttention`` child still takes its
own fast path, which reads only its own (plain) projections and so stays exact.

``nn.TransformerDecoderLayer`` and ``nn.TransformerDecoder`` have no fused path of
their own; their forwards call their children, so they need no subclass.
"""

from __future__ import annotations

from torch import Tensor, nn

from .channel_masked import ChannelMasked

NESTED_INPUT_MESSAGE = (
    "src is a nested tensor, which a converted {} cannot take: its SPA layers compute on "
    "padded tensors; pass a padded batch and src_key_padding_mask instead"
)


def _check_not_nested(src: Tensor, container: str) -> None:
    if src.is_nested:
        raise ValueError(NESTED_INPUT_MESSAGE.format(container))


class ComposedTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` whose forward always calls its children.

    Computes what PyTorch computes outside inference (post- or pre-norm per
    ``norm_first``), in every mode; masks are handed to ``self_attn``, which checks
    and converts them.
    """

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        _check_not_nested(src, "TransformerEncoderLayer")
        x = src
        if self.norm_first:
            x = x + self._attention_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._feed_forward_block(self.norm2(x))
        else:
            x = self.norm1(x + self._attention_block(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._feed_forward_block(x))
        return x

    def _attention_block(
        self, x: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        attended = self.self_attn(
            x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
            need_weights=False, is_causal=is_causal,
        )[0]
        return self.dropout1(attended)

    def _feed_forward_block(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class ComposedTransformerEncoder(nn.TransformerEncoder):
    """``nn.TransformerEncoder`` that never packs its input into a nested tensor.

    Runs each layer on the padded batch with ``src_key_padding_mask``, as PyTorch does
    outside inference.  ``is_causal=None`` is passed on as ``False``: ``mask`` then
    carries the causal structure itself, which gives the same result.
    """

    def forward(
        self,
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
    ) -> Tensor:
        _check_not_nested(src, "TransformerEncoder")
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                           is_causal=bool(is_causal))
        if self.norm is not None:
            output = self.norm(output)
        return output


# torch container type (exact) -> the subclass that computes through its children.
COMPOSED_FORWARD_TYPES: dict[type[nn.Module], type[nn.Module]] = {
    nn.TransformerEncoderLayer: ComposedTransformerEncoderLayer,
    nn.TransformerEncoder: ComposedTransformerEncoder,
}

# Every torch type whose forward may read its children's weights in a fused kernel.
FUSED_FORWARD_TYPES: tuple[type[nn.Module], ...] = tuple(COMPOSED_FORWARD_TYPES)


def holds_spa_layer(module: nn.Module) -> bool:
    """Whether ``module`` or any module below it is an SPA layer."""
    return any(isinstance(m, ChannelMasked) for m in module.modules())


def use_composed_forward(module: nn.Module, name: str = "") -> bool:
    """Make a torch transformer container holding SPA layers compute through them.

    ``module`` of exact type ``nn.TransformerEncoderLayer``/``nn.TransformerEncoder``
    gets the ``Composed*`` subclass above (in place; an encoder's nested-tensor
    packing is switched off).  :func:`spa_kernels.convert` calls this on every module;
    call it yourself after placing SPA layers into such a container by hand.

    Returns:
        True if ``module``'s class was changed.

    Raises:
        TypeError: ``module`` is a subclass of one of those types (not one of ours)
            holding an SPA layer: its ``forward`` may take the fused path, and
            rebinding its class would drop the subclass's own code.  ``name`` is the
            module's path in the model, used in the message.
    """
    composed = COMPOSED_FORWARD_TYPES.get(type(module))
    if composed is None:
        is_foreign_subclass = isinstance(module, FUSED_FORWARD_TYPES) and not isinstance(
            module, tuple(COMPOSED_FORWARD_TYPES.values()))
        if is_foreign_subclass and holds_spa_layer(module):
            raise TypeError(
                f"'{name or type(module).__name__}' ({type(module).__name__}) subclasses a torch transformer "
                "container whose inference fast path reads its layers' weights directly, so the SPA layers "
                "inside it could be skipped; derive it from the matching spa_kernels.nn.Composed* class "
                "instead (its forward calls the children)")
        return False
    if not holds_spa_layer(module):
        return False
    module.__class__ = composed
    if isinstance(module, nn.TransformerEncoder):
        module.use_nested_tensor = False
    return True


__all__ = ["ComposedTransformerEncoder", "ComposedTransformerEncoderLayer", "use_composed_forward"]
