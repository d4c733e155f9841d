"""spa_kernels.compact: the physically smaller plain model computes what the pruned model does."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from support.pruning_models import ResidualCNN, residual_cnn_input
from support.whole_models import (
    HAS_TRANSFORMERS,
    EncoderClassifier,
    encoder_input,
    hf_bert,
    hf_bert_input,
    hf_vit,
    hf_vit_input,
    logits,
)
from torch import nn

import spa_kernels
from spa_kernels.nn import ChannelMasked, PrunedHeadsAttention, SPLoRAMultiheadAttention
from spa_kernels.pruning import AttentionGroup, channel_groups


def pruned_and_trained(build, make_input):
    model = spa_kernels.convert(build(), rank=2, exclude=["head"])
    x = make_input()
    generator = torch.Generator().manual_seed(1)
    for group in channel_groups(model, (x,)):
        keep = torch.rand(group.size, generator=generator) < 0.5
        keep[0] = True
        group.apply(model, keep)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
    return model.eval(), x


@pytest.mark.parametrize(("build", "make_input"), [(ResidualCNN, residual_cnn_input),
                                                   (EncoderClassifier, encoder_input)])
def test_compact_model_is_smaller_plain_and_equal_in_eval(build, make_input):
    model, x = pruned_and_trained(build, make_input)
    small = spa_kernels.compact(model, (x,))
    assert not any(isinstance(module, ChannelMasked) for module in small.modules())
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert any(isinstance(m, ChannelMasked) for m in model.modules())  # the model itself is untouched
    x = make_input(batch=3)
    with torch.enable_grad():  # keeps torch's encoder off its fused path, which reads weights directly
        want, got = model(x), small.eval()(x)
    error = (got - want).abs().max().item()
    print(f"{build.__name__}: compact against masked model, max error {error:.3e}")
    assert error <= 1e-5 * max(want.abs().max().item(), 1.0)


def test_norms_shrink_with_their_channel_group():
    model, x = pruned_and_trained(ResidualCNN, residual_cnn_input)
    small = spa_kernels.compact(model, (x,))
    kept = int(model.stem.out_mask.sum())
    assert small.stem.out_channels == kept == small.stem_bn.num_features == small.block.bn2.num_features
    assert small.block.conv1.in_channels == kept and small.stem_bn.running_mean.numel() == kept
    assert small.head.in_features == int(model.down.conv2.out_mask.sum())


def test_compact_refuses_a_model_without_spa_layers():
    with pytest.raises(ValueError, match="no SPA layers"):
        spa_kernels.compact(nn.Linear(3, 3), torch.randn(1, 3))


def _prune_at_random(model: nn.Module, x: torch.Tensor, *, whole_heads: bool):
    groups = channel_groups(model, (x,), whole_heads=whole_heads)
    generator = torch.Generator().manual_seed(2)
    for group in groups:
        keep = torch.rand(group.size, generator=generator) < 0.5
        keep[0] = True
        group.apply(model, keep)
    return groups


def _check_compact_equal(model: nn.Module, x: torch.Tensor, **options) -> None:
    small = spa_kernels.compact(model, (x,), **options).eval()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    want, got = logits(model(x)), logits(small(x))
    error = (got - want).abs().max().item()
    print(f"max error {error:.3e}")
    assert error <= 1e-5 * max(want.abs().max().item(), 1.0)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
@pytest.mark.parametrize(("build", "make_input"), [(hf_vit, hf_vit_input), (hf_bert, hf_bert_input)])
def test_hugging_face_models_compact_with_whole_heads_removed(build, make_input):
    model = spa_kernels.convert(build(), rank=2, exclude=["classifier"])
    x = make_input()
    _prune_at_random(model, x, whole_heads=True)
    model.eval()
    _check_compact_equal(model, x)  # the model's own reshape (-1 heads) follows the fewer heads


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
@pytest.mark.parametrize(("build", "make_input"), [(hf_vit, hf_vit_input), (hf_bert, hf_bert_input)])
def test_hugging_face_models_compact_with_attention_kept_at_full_width(build, make_input):
    model = spa_kernels.convert(build(), rank=2, exclude=["classifier"])
    x = make_input()
    groups = _prune_at_random(model, x, whole_heads=False)
    model.eval()
    with pytest.raises(ValueError, match="per-head reshape"):  # channels pruned inside heads
        spa_kernels.compact(model, (x,))
    attention = sorted({name for group in groups if isinstance(group, AttentionGroup)
                        for name in (*group.out_maps, *group.in_maps)})
    assert attention
    _check_compact_equal(model, x, keep_width=attention)


# ------------------------------------------------------------------ attention with pruned heads

KEPT_HEADS = [0, 2]


def spa_attention(kdim=None, vdim=None, extras=(False, False), batch_first=False) -> SPLoRAMultiheadAttention:
    """Four heads of width 4, heads 1 and 3 pruned; non-zero adapters and biases."""
    layer = SPLoRAMultiheadAttention(16, 4, add_bias_kv=extras[0], add_zero_attn=extras[1], kdim=kdim, vdim=vdim,
                                     batch_first=batch_first, rank=2)
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            getattr(layer, name).adapter.cols.normal_(std=0.3)
        layer.in_proj_bias.normal_()
        layer.out_proj.bias.normal_()
    head_mask = torch.zeros(4, dtype=torch.bool)
    head_mask[KEPT_HEADS] = True
    layer.set_masks(head_mask=head_mask)
    return layer.eval()


def attention_inputs(layer, batch=3, target=5, source=6):
    def sequence(length, width):
        return torch.randn(batch, length, width) if layer.batch_first else torch.randn(length, batch, width)
    return sequence(target, layer.embed_dim), sequence(source, layer.kdim), sequence(source, layer.vdim)


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    error = (got - want).abs().max().item()
    print(f"{what}: max error {error:.3e}")
    assert error <= 1e-5 * max(want.abs().max().item(), 1.0), what


@pytest.mark.parametrize(("dims", "extras", "batch_first"),
                         [((None, None), (False, False), False), ((5, 7), (True, True), True),
                          ((None, None), (True, False), True)])
def test_attention_with_pruned_heads_compacts_to_the_kept_heads(dims, extras, batch_first):
    layer = spa_attention(*dims, extras=extras, batch_first=batch_first)
    query, key, value = attention_inputs(layer)
    small = spa_kernels.compact(layer, (query, key, value))
    assert isinstance(small, PrunedHeadsAttention) and not small.training
    assert small.num_heads == 2 and small.q_proj.out_features == small.out_proj.in_features == 8
    assert small.kept_heads.tolist() == KEPT_HEADS
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in layer.parameters())
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[1, 4:] = True
    per_head_mask = torch.randn(3 * 4, 5, 6)  # one plane per head of the unpruned layer
    for need_weights, average in itertools.product((False, True), (True, False)):
        options = {"need_weights": need_weights, "average_attn_weights": average,
                   "key_padding_mask": padding, "attn_mask": per_head_mask}
        (want, want_weights), (got, got_weights) = layer(query, key, value, **options), small(query, key, value, **options)
        assert_close(got, want, f"output, need_weights={need_weights}")
        if not need_weights:
            assert got_weights is None
        elif average:  # the mean over the heads that compute, on both sides
            assert_close(got_weights, want_weights, "averaged weights")
        else:  # the masked layer reports zeros at its pruned heads; the small one has only the kept heads
            assert_close(got_weights, want_weights[:, KEPT_HEADS], "per-head weights")


def test_attention_with_pruned_heads_takes_unbatched_input_and_masks_of_its_own_heads():
    layer = spa_attention()
    query, key, value = (t[:, 0] for t in attention_inputs(layer))
    small = spa_kernels.compact(layer, (query, key, value))
    assert_close(small(query, key, value)[0], layer(query, key, value)[0], "unbatched output")
    query, key, value = attention_inputs(layer, batch=2)
    planes = torch.randn(2, 4, 5, 6)
    want = layer(query, key, value, attn_mask=planes.flatten(0, 1), need_weights=False)[0]
    got = small(query, key, value, attn_mask=planes[:, KEPT_HEADS].flatten(0, 1), need_weights=False)[0]
    assert_close(got, want, "attn_mask with one plane per kept head")
    with pytest.raises(ValueError, match="attn_mask"):
        small(query, key, value, attn_mask=torch.zeros(2 * 3, 5, 6))


def test_attention_with_every_head_active_stays_a_torch_module():
    layer = spa_attention()
    layer.set_masks(head_mask=torch.ones(4, dtype=torch.bool))
    inputs = attention_inputs(layer)
    small = spa_kernels.compact(layer, inputs)
    assert type(small) is nn.MultiheadAttention
    assert_close(small(*inputs)[0], layer(*inputs)[0], "output")


def test_channels_pruned_inside_kept_heads_stay_as_zeros():
    layer = spa_attention()
    inside = torch.ones(16, dtype=torch.bool)
    inside[[1, 9]] = False  # one channel in each kept head
    for name in ("v_proj", "q_proj", "k_proj"):
        getattr(layer, name).set_masks(out_mask=layer.v_proj.out_mask & inside)
    layer.out_proj.set_masks(in_mask=layer.v_proj.out_mask)
    inputs = attention_inputs(layer)
    small = spa_kernels.compact(layer, inputs)
    assert small.head_dim == 4 and small.num_heads == 2  # every head of a layer has one width
    assert not small.v_proj.weight[[1, 5]].any() and not small.v_proj.bias[[1, 5]].any()
    assert_close(small(*inputs)[0], layer(*inputs)[0], "output")


def encoder_with_pruned_heads():
    model = spa_kernels.convert(EncoderClassifier(width=16, heads=4), rank=2, exclude=["head"])
    x = encoder_input()
    kept_heads = iter([torch.tensor([True, False, True, False]), torch.tensor([False, True, True, True])])
    for group in channel_groups(model, (x,)):
        keep = next(kept_heads) if isinstance(group, AttentionGroup) else torch.arange(group.size) % 3 != 1
        group.apply(model, keep)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape) * 0.1)
    return model.eval(), x


def test_torch_encoder_with_pruned_heads_compacts_and_follows_the_masks():
    model, x = encoder_with_pruned_heads()
    small = spa_kernels.compact(model, (x,)).eval()
    attention = [small.encoder.layers[i].self_attn for i in range(2)]
    assert all(isinstance(a, PrunedHeadsAttention) for a in attention)
    assert [a.kept_heads.tolist() for a in attention] == [[0, 2], [1, 2, 3]]
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():  # eval without autograd: torch's containers would take their fused path if they could
        assert_close(small(x), model(x), "classifier output")
    h = torch.randn(2, 7, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[0, 5:] = True
    cases = {"causal": {"mask": causal, "is_causal": True}, "key_padding_mask": {"src_key_padding_mask": padding},
             "causal with padding": {"mask": causal, "src_key_padding_mask": padding, "is_causal": True}}
    for what, masks in cases.items():
        with torch.no_grad():
            assert_close(small.encoder(h, **masks), model.encoder(h, **masks), what)
    want, want_weights = model.encoder.layers[0].self_attn(h, h, h, key_padding_mask=padding)
    got, got_weights = attention[0](h, h, h, key_padding_mask=padding)
    assert_close(got, want, "attention output with need_weights")
    assert_close(got_weights, want_weights, "averaged attention weights")


def test_pruned_heads_attention_is_a_drop_in_inside_torch_layers():
    """Inside a plain torch encoder layer (fused path when it may) and a converted decoder, eval and no_grad."""
    base = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    spa = SPLoRAMultiheadAttention.from_module(base.self_attn)
    spa.set_masks(head_mask=torch.tensor([True, False, True, False]))
    masked, small = base, copy.deepcopy(base)
    masked.self_attn = spa.to_module()  # pruned heads zeroed: torch's own module, fused path and all
    small.self_attn = PrunedHeadsAttention.from_module(spa)
    h, padding = torch.randn(2, 7, 16), torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True
    with torch.no_grad():
        assert_close(small(h, src_key_padding_mask=padding), masked(h, src_key_padding_mask=padding), "encoder layer")

    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0), 2)
    model = spa_kernels.convert(decoder, rank=2).eval()
    for layer in model.layers:
        layer.self_attn.set_masks(head_mask=torch.tensor([True, True, False, False]))
        layer.multihead_attn.set_masks(head_mask=torch.tensor([False, True, True, True]))
    target, memory = torch.randn(6, 2, 16), torch.randn(5, 2, 16)
    small = spa_kernels.compact(model, (target, memory)).eval()
    assert all(isinstance(getattr(layer, name), PrunedHeadsAttention)
               for layer in small.layers for name in ("self_attn", "multihead_attn"))
    masks = {"tgt_mask": nn.Transformer.generate_square_subsequent_mask(6), "tgt_is_causal": True,
             "memory_key_padding_mask": padding[:, :5]}
    with torch.no_grad():
        assert_close(small(target, memory, **masks), model(target, memory, **masks), "decoder")


def test_gradients_through_the_kept_heads_equal_the_masked_layers():
    layer = spa_attention(batch_first=True)
    inputs = attention_inputs(layer)
    small = spa_kernels.compact(layer, inputs)
    gradients = []
    for module in (layer, small):
        query = inputs[0].clone().requires_grad_()
        module(query, inputs[1], inputs[2], need_weights=False)[0].square().sum().backward()
        gradients.append(query.grad)
    assert_close(gradients[1], gradients[0], "query gradient")


@pytest.mark.parametrize(("kept_heads", "error", "message"), [
    ([4], ValueError, r"kept_heads must lie in \[0, 4\)"),
    ([2, 1], ValueError, "kept_heads must be strictly increasing"),
    (torch.zeros(1, 1, dtype=torch.int64), ValueError, "kept_heads must be 1-D"),
    (torch.tensor([0.0]), TypeError, "kept_heads must hold head indices"),
    ([True], TypeError, "kept_heads must hold head indices"),
])
def test_bad_kept_heads_raise_naming_the_argument(kept_heads, error, message):
    with pytest.raises(error, match=message):
        PrunedHeadsAttention(16, 4, kept_heads)


def test_from_module_checks_its_arguments():
    with pytest.raises(TypeError, match="module must be an nn.MultiheadAttention"):
        PrunedHeadsAttention.from_module(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="kept_heads must be given"):
        PrunedHeadsAttention.from_module(nn.MultiheadAttention(16, 4))
    with pytest.raises(ValueError, match="query is a nested tensor"):
        nested = torch.nested.nested_tensor([torch.randn(3, 16), torch.randn(2, 16)])
        PrunedHeadsAttention(16, 4, [0])(nested, nested, nested)
