"""Code that reads a converted layer's weight without calling it: handled, or refused.

Each way a model or a tool can use a layer's ``weight`` directly (and so skip the
adapter and masks) is here with what ``convert`` or the SPA module does about it;
``docs/bypasses.md`` lists them.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

import spa_kernels
from spa_kernels.nn import ChannelMasked, SPLoRAConv2d, SPLoRALinear

TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def _adapted_linear(in_features: int = 6, out_features: int = 5) -> SPLoRALinear:
    layer = SPLoRALinear(in_features, out_features, rank=2)
    nn.init.normal_(layer.adapter.cols, std=0.3)
    layer.set_masks(in_mask=torch.arange(in_features) != 1, out_mask=torch.arange(out_features) != 2)
    return layer


def _expected_linear(layer: SPLoRALinear, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return spa_kernels.splora_linear(x, weight, layer.adapter.rows[0], layer.adapter.cols[0], layer.bias,
                                     layer.in_idx, layer.out_idx, scale=layer.scale)


class TiedLanguageModel(nn.Module):
    """An output head tied to the input embedding, as in GPT-2 and BERT's masked-LM head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.embed(tokens))))


def test_tied_head_is_left_unchanged_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="spa_kernels"):
        model = spa_kernels.convert(TiedLanguageModel(), rank=2)
    assert type(model.head) is nn.Linear and model.head.weight is model.embed.weight
    assert isinstance(model.body, SPLoRALinear)
    assert "'head' (Linear) left unchanged" in caplog.text and "'embed'" in caplog.text


def test_layer_used_twice_stays_one_shared_layer():
    shared = nn.Linear(4, 4)
    model = spa_kernels.convert(nn.Sequential(shared, nn.ReLU(), shared), rank=2)
    assert isinstance(model[0], SPLoRALinear) and model[0] is model[2]


class RelativePositionTable(nn.Module):
    """Uses a linear layer's weight as a lookup table, as some Hugging Face attentions do."""

    def __init__(self) -> None:
        super().__init__()
        self.rel_pos_bias = nn.Linear(7, 3, bias=False)
        self.proj = nn.Linear(3, 3)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.proj(self.rel_pos_bias.weight.t()[positions])


def test_layer_whose_weight_its_parent_reads_is_left_unchanged(caplog):
    with caplog.at_level(logging.WARNING, logger="spa_kernels"):
        model = spa_kernels.convert(nn.Sequential(RelativePositionTable()), rank=2)
    assert type(model[0].rel_pos_bias) is nn.Linear
    assert isinstance(model[0].proj, SPLoRALinear)
    assert "'0.rel_pos_bias' (Linear) left unchanged: RelativePositionTable reads" in caplog.text


def test_spa_layer_whose_weight_its_parent_reads_is_refused():
    module = RelativePositionTable()
    module.rel_pos_bias = SPLoRALinear.from_module(module.rel_pos_bias, rank=2)
    with pytest.raises(ValueError, match=r"'rel_pos_bias' \(SPLoRALinear\) is an SPA layer"):
        spa_kernels.convert(module, rank=2)


def test_metadata_reads_do_not_count():
    class ReadsDtype(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x.to(self.proj.weight.dtype))

    assert isinstance(spa_kernels.convert(ReadsDtype(), rank=2).proj, SPLoRALinear)


class Doubled(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


def test_parametrized_weight_goes_through_the_adapter():
    layer = _adapted_linear()
    parametrize.register_parametrization(layer, "weight", Doubled())
    assert isinstance(layer, SPLoRALinear)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), _expected_linear(layer, x, 2 * layer.parametrizations.weight.original),
                               **TOLERANCE)


def test_torch_pruned_weight_goes_through_the_adapter():
    layer = _adapted_linear()
    prune.l1_unstructured(layer, "weight", amount=0.5)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), _expected_linear(layer, x, layer.weight_orig * layer.weight_mask),
                               **TOLERANCE)
    prune.remove(layer, "weight")
    torch.testing.assert_close(layer(x), _expected_linear(layer, x, layer.weight), **TOLERANCE)


def _conv_bn() -> tuple[SPLoRAConv2d, nn.BatchNorm2d]:
    conv = SPLoRAConv2d.from_module(nn.Conv2d(3, 4, 3, padding=1), rank=2)
    nn.init.normal_(conv.adapter.cols, std=0.3)
    conv.set_masks(out_mask=torch.tensor([True, False, True, True]))
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    return conv.eval(), bn.eval()


def test_batch_norm_folding_is_refused_and_the_merged_layer_folds_exactly():
    conv, bn = _conv_bn()
    with pytest.raises(TypeError, match=r"SPLoRAConv2d\.weight cannot be replaced.*to_module\(\)"):
        fuse_conv_bn_eval(conv, bn)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(fuse_conv_bn_eval(conv.to_module(), bn)(x), bn(conv(x)), **TOLERANCE)

    linear, bn1d = _adapted_linear().eval(), nn.BatchNorm1d(5).eval()
    with pytest.raises(TypeError, match=r"SPLoRALinear\.weight cannot be replaced"):
        fuse_linear_bn_eval(linear, bn1d)


def test_weight_loads_with_assign_and_changes_in_place():
    layer = _adapted_linear()
    state = {key: value.clone() + 1 if key == "weight" else value.clone() for key, value in layer.state_dict().items()}
    fresh = SPLoRALinear(6, 5, rank=2)
    fresh.load_state_dict(state, assign=True)
    torch.testing.assert_close(fresh.weight, layer.weight + 1)
    with torch.no_grad():
        fresh.weight.copy_(layer.weight)
    x = torch.randn(2, 6)
    torch.testing.assert_close(fresh(x), layer(x))


def test_functional_call_substitutes_the_weight_through_the_adapter():
    """torch.func.functional_call swaps parameters without assigning them: still allowed, still exact."""
    layer = _adapted_linear()
    x = torch.randn(3, 6)
    doubled = {name: 2 * value if name == "weight" else value for name, value in layer.named_parameters()}
    torch.testing.assert_close(torch.func.functional_call(layer, doubled, (x,)),
                               _expected_linear(layer, x, 2 * layer.weight), **TOLERANCE)


def _converted_cnn() -> tuple[nn.Module, torch.Tensor]:
    model = spa_kernels.convert(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                              nn.Flatten(), nn.Linear(8 * 4 * 4, 5)), rank=2).eval()
    for layer in model.modules():
        if isinstance(layer, ChannelMasked):
            nn.init.normal_(layer.adapter.cols, std=0.3)
    return model, torch.randn(2, 3, 4, 4)


def test_eager_quantization_fuser_refuses_spa_layers():
    model, _ = _converted_cnn()
    with pytest.raises(AssertionError, match="did not find fuser method.*SPLoRAConv2d"):
        torch.ao.quantization.fuse_modules(model, [["0", "1"]])


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("spec", ["linear_types", "whole_model"])
def test_dynamic_quantization_leaves_spa_layers_exact(spec):
    model, x = _converted_cnn()
    reference = model(x).detach()
    qconfig_spec = {nn.Linear} if spec == "linear_types" else {"": torch.ao.quantization.default_dynamic_qconfig}
    quantized = torch.ao.quantization.quantize_dynamic(model, qconfig_spec, dtype=torch.qint8)
    assert type(quantized[4]) is SPLoRALinear
    torch.testing.assert_close(quantized(x).detach(), reference)


def test_fx_symbolic_tracing_refuses_and_export_computes_through_the_op():
    """The fx fusers and FX quantization need symbolic tracing, which stops at the SPA forward."""
    import torch.fx.experimental.optimization as fx_optimization  # imports torch.jit, which warns

    model, x = _converted_cnn()
    with pytest.raises(torch.fx.proxy.TraceError):
        fx_optimization.fuse(model)
    exported = torch.export.export(model, (x,))
    assert any("spa_kernels" in str(node.target) for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), model(x).detach(), **TOLERANCE)


def test_functional_linear_on_a_module_weight_is_found():
    """The Hugging Face router pattern ``F.linear(x, self.gate.weight)``."""

    class Router(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Linear(4, 3, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.gate.weight)

    assert type(spa_kernels.convert(Router(), rank=2).gate) is nn.Linear
