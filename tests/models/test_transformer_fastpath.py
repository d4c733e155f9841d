"""Converted torch transformer containers compute through their SPA layers in inference.

PyTorch's ``nn.TransformerEncoderLayer``/``nn.TransformerEncoder`` read their layers'
weights into one fused kernel in inference; after ``convert`` they must not.
"""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import spa_kernels
from spa_kernels.nn import (
    ChannelMasked,
    ComposedTransformerEncoder,
    ComposedTransformerEncoderLayer,
    SPLoRALinear,
    use_composed_forward,
)

TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
FUSED_LAYER_KERNEL = "aten::_transformer_encoder_layer_fwd"
NATIVE_ATTENTION_KERNEL = "aten::_native_multi_head_attention"


@pytest.fixture(autouse=True)
def _quiet_convert():
    logging.getLogger("spa_kernels").setLevel(logging.ERROR)  # attention modules are left unchanged
    yield
    logging.getLogger("spa_kernels").setLevel(logging.NOTSET)


def _adapt(model: nn.Module) -> nn.Module:
    for layer in model.modules():
        if isinstance(layer, ChannelMasked):
            nn.init.normal_(layer.adapter.cols, std=0.2)
            layer.set_masks(out_mask=torch.arange(layer.out_features) % 3 != 0)
    return model


def _kernels_run(model: nn.Module, *args, **kwargs) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(*args, **kwargs)
    return {event.name for event in prof.events()}


def test_issue_reproduction_every_mode():
    """The converted encoder gives its training-mode output in eval, no_grad and inference_mode."""
    encoder = spa_kernels.convert(nn.TransformerEncoder(
        nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True), 2,
        enable_nested_tensor=False), rank=4)
    for layer in encoder.layers:
        nn.init.normal_(layer.linear1.adapter.cols, std=0.2)
        layer.linear1.set_masks(out_mask=torch.arange(128) % 2 == 0)
    x = torch.randn(2, 5, 64)
    reference = encoder.train()(x).detach()
    encoder.eval()
    torch.testing.assert_close(encoder(x).detach(), reference, **TOLERANCE)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), reference, **TOLERANCE)
    with torch.inference_mode():
        torch.testing.assert_close(encoder(x), reference, **TOLERANCE)


def test_convert_rebinds_the_containers_and_keeps_their_state():
    base = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 24, batch_first=True), 2)
    converted = spa_kernels.convert(base, rank=2, exclude=[nn.MultiheadAttention])
    assert type(converted) is ComposedTransformerEncoder and not converted.use_nested_tensor
    assert all(type(layer) is ComposedTransformerEncoderLayer for layer in converted.layers)
    assert isinstance(converted.layers[0], nn.TransformerEncoderLayer)
    assert type(converted.layers[0].self_attn) is nn.MultiheadAttention  # excluded: left as it is
    base_keys = set(base.state_dict())
    assert base_keys <= set(converted.state_dict())
    assert type(base) is nn.TransformerEncoder  # the original is not touched


def test_fast_path_is_skipped_but_attention_keeps_its_native_kernel():
    """The fused layer kernel never runs; the unconverted attention's own kernel does, exactly."""
    base = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=True), 2).eval()
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[1, 4:] = True
    x = torch.randn(3, 6, 16)
    with torch.no_grad():
        assert FUSED_LAYER_KERNEL in _kernels_run(base, x)  # the profile does see the fast path
        converted = _adapt(spa_kernels.convert(base, rank=2, exclude=[nn.MultiheadAttention]))
        kernels = _kernels_run(converted, x, src_key_padding_mask=padding)
        assert FUSED_LAYER_KERNEL not in kernels
        assert NATIVE_ATTENTION_KERNEL in kernels
        out = converted(x, src_key_padding_mask=padding)
    torch.testing.assert_close(out, converted.train()(x, src_key_padding_mask=padding).detach(), **TOLERANCE)


@pytest.mark.parametrize("norm_first", [False, True])
def test_composed_forward_computes_what_torch_computes(norm_first):
    """With zero adapters and no masks, the converted layer equals the torch layer, masks and all."""
    base = nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True, norm_first=norm_first,
                                      activation="gelu").eval()
    converted = spa_kernels.convert(base, rank=2)
    for layer in converted.modules():
        if isinstance(layer, ChannelMasked):
            nn.init.zeros_(layer.adapter.cols)
    x = torch.randn(2, 5, 16)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)  # bool like the padding mask: True = masked
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    for kwargs in ({}, {"src_mask": causal, "is_causal": True}, {"src_key_padding_mask": padding},
                   {"src_mask": causal, "src_key_padding_mask": padding}):
        with torch.no_grad():
            torch.testing.assert_close(converted(x, **kwargs), base(x, **kwargs), **TOLERANCE)


def test_self_attention_may_be_replaced_by_a_module_without_in_proj():
    class ProjectedAttention(nn.Module):
        """Attention whose projections are SPA layers: no ``in_proj_weight``, no ``batch_first``."""

        def __init__(self, dim: int) -> None:
            super().__init__()
            self.value = SPLoRALinear(dim, dim, rank=2)
            self.out = SPLoRALinear(dim, dim, rank=2)

        def forward(self, query, key, value, **kwargs):
            return self.out(self.value(value).mean(dim=1, keepdim=True).expand_as(query)), None

    layer = spa_kernels.convert(nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True), rank=2)
    layer.self_attn = ProjectedAttention(8)
    _adapt(layer)
    x = torch.randn(2, 3, 8)
    reference = layer(x).detach()
    layer.eval()
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), reference, **TOLERANCE)


def test_whole_transformer_is_converted():
    base = nn.Transformer(16, 2, 1, 1, 24, dropout=0.0, batch_first=True)
    converted = _adapt(spa_kernels.convert(base, rank=2))
    assert type(converted.encoder) is ComposedTransformerEncoder
    src, tgt = torch.randn(2, 5, 16), torch.randn(2, 4, 16)
    reference = converted(src, tgt).detach()
    converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(src, tgt), reference, **TOLERANCE)
        assert (converted(src, tgt) - base.eval()(src, tgt)).abs().max() > 1e-2


def test_nested_input_is_refused():
    converted = spa_kernels.convert(nn.TransformerEncoderLayer(8, 2, 12, batch_first=True), rank=2).eval()
    nested = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(2, 8)])
    with torch.no_grad(), pytest.raises(ValueError, match="nested tensor"):
        converted(nested)


def test_subclass_with_the_fast_path_is_refused():
    class CustomLayer(nn.TransformerEncoderLayer):
        pass

    model = nn.Sequential(CustomLayer(8, 2, 12, batch_first=True))
    with pytest.raises(TypeError, match=r"'0' \(CustomLayer\)"):
        spa_kernels.convert(model, rank=2)

    class ComposedCustomLayer(ComposedTransformerEncoderLayer):
        pass

    accepted = spa_kernels.convert(nn.Sequential(ComposedCustomLayer(8, 2, 12, batch_first=True)), rank=2)
    assert isinstance(accepted[0].linear1, SPLoRALinear)


def test_attention_holding_an_spa_layer_is_refused():
    layer = nn.TransformerEncoderLayer(8, 2, 12, batch_first=True)
    layer.self_attn.out_proj = SPLoRALinear.from_module(nn.Linear(8, 8), rank=2)
    with pytest.raises(ValueError, match=r"'self_attn' \(MultiheadAttention\)"):
        spa_kernels.convert(layer, rank=2)


def test_plain_container_is_left_alone():
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 12, batch_first=True), 1)
    assert not use_composed_forward(encoder)
    assert type(encoder) is nn.TransformerEncoder


def test_converted_encoder_survives_pickling_and_deepcopy():
    converted = _adapt(spa_kernels.convert(
        nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True), 2), rank=2)).eval()
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        expected = converted(x)
        for copy_ in (loaded, copy.deepcopy(converted)):
            assert type(copy_) is ComposedTransformerEncoder
            torch.testing.assert_close(copy_(x), expected)
