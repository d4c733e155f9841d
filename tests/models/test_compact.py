"""spa_kernels.compact: the physically smaller plain model computes what the pruned model does."""

from __future__ import annotations

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
from spa_kernels.nn import ChannelMasked
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
