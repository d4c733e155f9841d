"""convert's freeze policy, exclusion and report: what trains after a conversion, and what it says it did."""

from __future__ import annotations

import logging

import pytest
import torch
from support.pruning_models import ResidualCNN
from support.whole_models import HAS_TRANSFORMERS, EncoderClassifier, encoder_input, hf_bert, hf_vit
from torch import nn

import spa_kernels
from spa_kernels.conversion_report import ConversionReport, conversion_report
from spa_kernels.nn import SPLoRAConv2d, SPLoRALinear


def trainable(model: nn.Module) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


ADAPTED_CNN = {"stem", "block.conv1", "block.conv2", "down.conv1", "down.conv2", "down.shortcut.0"}
CNN_NORMS = {"stem_bn", "block.bn1", "block.bn2", "down.bn1", "down.bn2", "down.shortcut.1"}


def test_default_policy_on_a_cnn_with_the_head_excluded():
    model = spa_kernels.convert(ResidualCNN(), rank=2, exclude=["head"])
    assert type(model.head) is nn.Linear and isinstance(model.stem, SPLoRAConv2d)
    want = {f"{name}.adapter.{part}" for name in ADAPTED_CNN for part in ("rows", "cols")}
    want |= {f"{name}.{part}" for name in CNN_NORMS for part in ("weight", "bias")}
    want |= {"head.weight", "head.bias"}  # the convs have no bias
    assert trainable(model) == want


def test_excluded_module_is_kept_as_it_is():
    base = ResidualCNN()
    model = spa_kernels.convert(base, rank=2, exclude="head")
    assert torch.equal(model.head.weight, base.head.weight) and model.head is not base.head
    inplace = spa_kernels.convert(base, rank=2, exclude=[nn.Linear], inplace=True)
    assert inplace.head is base.head and type(inplace.head) is nn.Linear


def test_encoder_embeddings_tokens_and_attention_are_frozen():
    model = spa_kernels.convert(EncoderClassifier(), rank=2, exclude=["head"])
    names = trainable(model)
    assert {"embed.weight", "position", "cls_token"}.isdisjoint(names)
    if type(model.encoder.layers[0].self_attn) is nn.MultiheadAttention:  # left alone: frozen in full
        assert not any(".self_attn." in name for name in names)
    assert {"norm.weight", "norm.bias", "head.weight", "head.bias", "encoder.layers.0.norm1.weight",
            "encoder.layers.0.linear1.adapter.rows", "encoder.layers.0.linear1.bias"} <= names
    assert "encoder.layers.0.linear1.weight" not in names
    model(encoder_input()).sum().backward()  # the frozen parts need no grad to run backward


@pytest.mark.parametrize("exclude", [["head", "down"], ["down*", "head"], [nn.Linear, "down"]])
def test_exclude_by_name_pattern_and_type(exclude):
    model = spa_kernels.convert(ResidualCNN(), rank=2, exclude=exclude)
    assert type(model.head) is nn.Linear and type(model.down.conv1) is nn.Conv2d
    assert isinstance(model.block.conv1, SPLoRAConv2d)
    assert {name for name, _ in model.down.named_parameters(prefix="down")} <= trainable(model)


def test_exclude_errors_name_the_argument():
    with pytest.raises(ValueError, match="exclude.*'haed'"):
        spa_kernels.convert(ResidualCNN(), exclude=["haed"])
    with pytest.raises(TypeError, match="exclude"):
        spa_kernels.convert(ResidualCNN(), exclude=[3])
    with pytest.raises(ValueError, match="train_bias"):
        spa_kernels.convert(ResidualCNN(), train_bias="some")


def test_options_keep_more_or_less_trainable():
    base = EncoderClassifier()
    no_norms = trainable(spa_kernels.convert(base, rank=2, train_norms=False))
    assert not any("norm" in name for name in no_norms) and "head.adapter.rows" in no_norms
    no_bias = trainable(spa_kernels.convert(base, rank=2, train_bias="none"))
    assert not any(name.endswith(".bias") for name in no_bias if "norm" not in name)
    all_bias = trainable(spa_kernels.convert(base, rank=2, train_bias="all"))
    assert "encoder.layers.0.self_attn.in_proj_bias" in all_bias  # the converted attention's q/k/v bias
    assert "encoder.layers.0.self_attn.in_proj_bias" not in no_bias
    assert "encoder.layers.0.linear1.bias" in all_bias
    more = trainable(spa_kernels.convert(base, rank=2, trainable=["embed.*", "cls_token"]))
    assert {"embed.weight", "cls_token"} <= more and "position" not in more


def test_freeze_false_leaves_everything_but_the_converted_weights():
    base = EncoderClassifier()
    model = spa_kernels.convert(base, rank=2, freeze=False)
    assert {"embed.weight", "position", "cls_token"} <= trainable(model)
    assert "head.weight" not in trainable(model)


def test_report_names_what_was_converted_left_alone_and_trains(caplog):
    class ScaledLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 2), nn.Flatten(), ScaledLinear(4, 4),
                          nn.BatchNorm1d(4), nn.Linear(4, 2))
    with caplog.at_level(logging.INFO, logger="spa_kernels"):
        converted, report = spa_kernels.convert(model, rank=1, exclude=["5"], report=True)
    assert isinstance(report, ConversionReport)
    assert report.converted == {"0": "SPLoRAConv2d"}
    assert set(report.left_alone) == {"1", "3", "5"}
    assert "even" in report.left_alone["1"] and "subclass" in report.left_alone["3"]
    assert "excluded" in report.left_alone["5"] and report.excluded == ["5"]
    assert set(report.trainable) == trainable(converted)
    assert report.total_parameters == sum(p.numel() for p in converted.parameters())
    assert report.trainable_parameters == sum(p.numel() for p in converted.parameters() if p.requires_grad)
    assert "converted 1 layers" in caplog.text and "left alone: 1" in caplog.text
    assert "4.weight" in str(report)  # a trainable norm outside the SPA layers is named
    assert conversion_report(converted).converted == report.converted


def test_converted_model_still_differs_from_nothing_and_trains():
    model = spa_kernels.convert(ResidualCNN(), rank=2, exclude=["head"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed <= trainable(model) and "head.weight" in changed
    assert all(not p.requires_grad for name, p in model.named_parameters() if name.endswith("conv1.weight"))


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
@pytest.mark.parametrize("build", [hf_bert, hf_vit])
def test_hugging_face_bert_and_vit_freeze_like_peft(build):
    model = spa_kernels.convert(build(), rank=2, exclude=["classifier"])
    names = trainable(model)
    assert type(model.classifier) is nn.Linear and {"classifier.weight", "classifier.bias"} <= names
    layers = {name for name, module in model.named_modules() if isinstance(module, SPLoRALinear)}
    assert len(layers) >= 2 * 6  # q, k, v, out, and the two MLP linears of each of the two layers
    for layer in layers:
        assert {f"{layer}.adapter.rows", f"{layer}.adapter.cols", f"{layer}.bias"} <= names
        assert f"{layer}.weight" not in names
    norms = {name for name, _ in model.named_parameters() if "norm" in name.lower()}
    assert norms and norms <= names
    outside = names - norms - {"classifier.weight", "classifier.bias"}
    assert all(name.rpartition(".")[0].rpartition(".")[0] in layers or name.rpartition(".")[0] in layers
               for name in outside), outside  # embeddings, tokens, the patch conv: frozen
