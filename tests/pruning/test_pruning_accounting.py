"""Stored-parameter and MAC counts against hand counts, sp_adapters and torch's FLOP counter."""

from __future__ import annotations

import pytest
import sp_adapters
import sp_adapters.splora
import sp_adapters.sppara
import torch
from support.pruning_models import ResidualCNN, residual_cnn_input
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import spa_kernels
from spa_kernels.nn import SPLoRAConv2d, SPLoRALinear, SPPaRAConv2d
from spa_kernels.pruning.accounting import (
    active_flops,
    active_macs,
    active_macs_by_layer,
    layer_stored_parameters,
    stored_parameters,
    stored_parameters_by_layer,
)


def _mask(bits: str) -> torch.Tensor:
    return torch.tensor([bit == "1" for bit in bits])


def _random_mask(n: int, generator: torch.Generator) -> torch.Tensor:
    mask = torch.rand(n, generator=generator) < 0.6
    mask[torch.randint(n, (1,), generator=generator)] = True
    return mask


# ---------------------------------------------------------------------------- stored parameters


def test_stored_parameters_by_hand():
    linear = SPLoRALinear(6, 5, rank=2)
    linear.set_masks(in_mask=_mask("110110"), out_mask=_mask("10101"))  # |S| = 4, |O| = 3
    assert layer_stored_parameters(linear) == 2 * (3 + 4) + 3 == 17
    assert layer_stored_parameters(linear, "fine-pruning") == 3 * 4 + 3 == 15

    no_bias = SPLoRALinear(6, 5, bias=False, rank=2)
    no_bias.set_masks(in_mask=_mask("110110"), out_mask=_mask("10101"))
    assert layer_stored_parameters(no_bias) == 14
    assert layer_stored_parameters(no_bias, "fine-pruning") == 12

    conv = SPLoRAConv2d(4, 6, 3, rank=3)
    conv.set_masks(in_mask=_mask("0101"), out_mask=_mask("111011"))  # |S| = 2, |O| = 5, k = 9
    assert layer_stored_parameters(conv) == 3 * (5 + 2) + 5 == 26
    assert layer_stored_parameters(conv, "fine-pruning") == 5 * 2 * 9 + 5 == 95

    parallel = SPPaRAConv2d(4, 6, 3)
    parallel.set_masks(in_mask=_mask("0101"), out_mask=_mask("111011"))
    assert layer_stored_parameters(parallel) == 5 * 2 + 5 == 15
    assert layer_stored_parameters(parallel, "fine-pruning") == 95


def test_stored_parameters_of_a_grouped_conv_by_hand():
    # two groups of 2 inputs and 3 outputs
    conv = SPLoRAConv2d(4, 6, 3, groups=2, rank=2)
    conv.set_masks(in_mask=_mask("1001"), out_mask=_mask("110100"))
    # A's columns 0 (group 0) and 1 (group 1) are used; |O| = 3
    assert layer_stored_parameters(conv) == 2 * (2 + 3) + 3 == 13
    # pairs: group 0 has 2 outputs × 1 input, group 1 has 1 × 1
    assert layer_stored_parameters(conv, "fine-pruning") == (2 + 1) * 9 + 3 == 30
    conv.set_masks(in_mask=_mask("1010"))  # both groups read only A's column 0
    assert layer_stored_parameters(conv) == 2 * (1 + 3) + 3 == 11

    parallel = SPPaRAConv2d(4, 6, 3, groups=2)
    parallel.set_masks(in_mask=_mask("1101"), out_mask=_mask("110100"))
    assert layer_stored_parameters(parallel) == (2 * 2 + 1 * 1) + 3 == 8


def _sp_adapters_count(module: nn.Module, in_mask, out_mask, package, adapter_weights_only=True) -> int:
    return sum(p.numel() for p in package.parameters(module, adapter_weights_only=adapter_weights_only,
                                                     in_features_mask=in_mask, out_features_mask=out_mask))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_stored_parameters_match_sp_adapters(bias, seed):
    generator = torch.Generator().manual_seed(seed)
    rank = int(torch.randint(1, 6, (1,), generator=generator))
    cases = [
        (SPLoRALinear(11, 7, bias=bias, rank=rank), sp_adapters.SPLoRALinear(11, 7, bias=bias, rank=rank),
         sp_adapters.splora),
        (SPLoRAConv2d(9, 13, 3, bias=bias, rank=rank), sp_adapters.SPLoRAConv2d(9, 13, 3, bias=bias, rank=rank),
         sp_adapters.splora),
        (SPPaRAConv2d(9, 13, 5, bias=bias), sp_adapters.SPPaRAConv2d(9, 13, 5, bias=bias), sp_adapters.sppara),
    ]
    for ours, theirs, package in cases:
        in_mask = _random_mask(ours.in_mask.numel(), generator)
        out_mask = _random_mask(ours.out_mask.numel(), generator)
        ours.set_masks(in_mask=in_mask, out_mask=out_mask)
        assert layer_stored_parameters(ours) == _sp_adapters_count(theirs, in_mask, out_mask, package)


@pytest.mark.parametrize("bias", [True, False])
def test_fine_pruning_matches_sp_adapters_on_the_plain_layer(bias):
    """sp_adapters counts a plain layer's pruned weight and bias when asked for every weight."""
    generator = torch.Generator().manual_seed(7)
    for ours, plain in [
        (SPLoRALinear(11, 7, bias=bias, rank=3), nn.Linear(11, 7, bias=bias)),
        (SPLoRAConv2d(9, 13, 3, bias=bias, rank=3), nn.Conv2d(9, 13, 3, bias=bias)),
        (SPPaRAConv2d(9, 13, (3, 5), bias=bias), nn.Conv2d(9, 13, (3, 5), bias=bias)),
    ]:
        in_mask = _random_mask(ours.in_mask.numel(), generator)
        out_mask = _random_mask(ours.out_mask.numel(), generator)
        ours.set_masks(in_mask=in_mask, out_mask=out_mask)
        expected = _sp_adapters_count(plain, in_mask, out_mask, sp_adapters.splora, adapter_weights_only=False)
        assert layer_stored_parameters(ours, "fine-pruning") == expected


def test_model_totals_and_masks_changing_the_counts():
    model = nn.Sequential(SPLoRALinear(8, 6, rank=2), nn.ReLU(), SPLoRALinear(6, 3, rank=1))
    assert stored_parameters_by_layer(model) == {"0": 2 * (8 + 6) + 6, "2": 1 * (6 + 3) + 3}
    assert stored_parameters(model) == 34 + 12
    assert stored_parameters(model, "fine-pruning") == (48 + 6) + (18 + 3)
    model[0].set_masks(out_mask=_mask("110011"))
    model[2].set_masks(in_mask=_mask("110011"))
    assert stored_parameters_by_layer(model) == {"0": 2 * (8 + 4) + 4, "2": 1 * (4 + 3) + 3}
    assert stored_parameters(model, "fine-pruning") == (32 + 4) + (12 + 3)


def test_a_converted_network_is_counted_layer_by_layer():
    model = spa_kernels.convert(ResidualCNN(), rank=2)
    by_layer = stored_parameters_by_layer(model)
    assert set(by_layer) == {"stem", "block.conv1", "block.conv2", "down.conv1", "down.conv2",
                             "down.shortcut.0", "head"}
    # convolutions have no bias here; the head has one
    assert by_layer["stem"] == 2 * (3 + 8)
    assert by_layer["down.shortcut.0"] == 2 * (8 + 16)
    assert by_layer["head"] == 2 * (16 + 4) + 4
    assert stored_parameters(model) == sum(by_layer.values())


# ---------------------------------------------------------------------------- MACs


def _two_layer_model() -> nn.Sequential:
    model = nn.Sequential(SPLoRAConv2d(3, 8, 3, stride=2, padding=1, rank=2), nn.Flatten(),
                          SPLoRALinear(128, 10, rank=3))
    model[0].set_masks(in_mask=_mask("110"), out_mask=_mask("11011010"))  # |S| = 2, |O| = 5
    model[2].set_masks(in_mask=torch.arange(128) < 100, out_mask=_mask("1111111000"))  # |S| = 100, |O| = 7
    return model


def test_macs_of_a_two_layer_model_by_hand():
    model = _two_layer_model()
    x = torch.randn(2, 3, 8, 8)
    # conv: 2 · 4 · 4 = 32 positions, 5·2·9 main + 2·(2+5) adapter; linear: 2 rows, 7·100 + 3·(100+7)
    assert active_macs_by_layer(model, x) == {"0": 32 * (90 + 14), "2": 2 * (700 + 321)}
    assert active_macs(model, x) == 3328 + 2042
    assert active_flops(model, x) == 2 * 5370
    assert active_macs(model, x, merged=True) == 32 * 90 + 2 * 700
    # every channel active: conv 8·3·9 + 2·(3+8), linear 10·128 + 3·(128+10)
    assert active_macs(model, x, dense=True) == 32 * (216 + 22) + 2 * (1280 + 414)
    assert active_macs(model, (x,)) == active_macs(model, {"input": x}) == 5370


def test_macs_of_sppara_and_of_positions_in_a_sequence():
    conv = SPPaRAConv2d(4, 5, 3, padding=1)
    conv.set_masks(in_mask=_mask("1011"), out_mask=_mask("01101"))  # |S| = 3, |O| = 3
    x = torch.randn(3, 4, 5, 6)
    assert active_macs(conv, x) == 3 * 5 * 6 * (3 * 3 * 9 + 3 * 3)
    assert active_macs(conv, x[0]) == 5 * 6 * (3 * 3 * 9 + 3 * 3)  # unbatched: one sample

    linear = SPLoRALinear(6, 4, rank=2)
    linear.set_masks(in_mask=_mask("111100"))
    assert active_macs(linear, torch.randn(2, 7, 6)) == 14 * (4 * 4 + 2 * (4 + 4))
    assert active_macs(linear, torch.randn(6)) == 4 * 4 + 2 * (4 + 4)


def test_masks_change_the_macs():
    model = _two_layer_model()
    x = torch.randn(1, 3, 8, 8)
    before = active_macs(model, x)
    model[0].set_masks(out_mask=_mask("10000000"))  # |O| = 1
    assert active_macs_by_layer(model, x)["0"] == 16 * (1 * 2 * 9 + 2 * (2 + 1))
    assert active_macs(model, x) < before
    model[0].set_masks(out_mask=torch.zeros(8, dtype=torch.bool), in_mask=torch.zeros(3, dtype=torch.bool))
    assert active_macs_by_layer(model, x)["0"] == 0


def test_layer_called_twice_counts_twice_and_unused_layer_counts_zero():
    shared = SPLoRALinear(4, 4, rank=1)
    unused = SPLoRALinear(4, 4, rank=1)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.unused = shared, unused

        def forward(self, x):
            return self.shared(self.shared(x))

    per_call = 3 * (16 + 8)
    assert active_macs_by_layer(Twice(), torch.randn(3, 4)) == {"shared": 2 * per_call, "unused": 0}


@pytest.mark.parametrize("layer_type", [SPLoRAConv2d, SPPaRAConv2d, SPLoRALinear])
def test_merged_flops_match_torch_flop_counter(layer_type):
    """Merged FLOPs equal torch's count for the compact layer, dense merged FLOPs for the full one."""
    generator = torch.Generator().manual_seed(3)
    if layer_type is SPLoRALinear:
        layer, x = SPLoRALinear(10, 7, rank=2), torch.randn(4, 5, 10)
    else:
        kwargs = {"rank": 2} if layer_type is SPLoRAConv2d else {}
        layer = layer_type(6, 9, (3, 5), stride=2, padding=(1, 2), **kwargs)
        x = torch.randn(2, 6, 9, 11)
    channel_dim = -1 if layer_type is SPLoRALinear else 1
    in_mask = _random_mask(layer.in_mask.numel(), generator)
    layer.set_masks(in_mask=in_mask, out_mask=_random_mask(layer.out_mask.numel(), generator))

    def torch_flops(module, inputs):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(inputs)
        return counter.get_total_flops()

    compact_input = x.index_select(channel_dim, torch.nonzero(in_mask).flatten())
    assert active_flops(layer, x, merged=True) == torch_flops(layer.compact(), compact_input)
    assert active_flops(layer, x, dense=True, merged=True) == torch_flops(layer.to_module(), x)


def test_counting_leaves_the_model_as_it_was():
    model = spa_kernels.convert(ResidualCNN(), rank=2).train()
    model.block.bn1.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    active_macs(model, residual_cnn_input())
    assert model.training and not model.block.bn1.training and model.block.bn2.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # batch-norm statistics untouched
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


# ---------------------------------------------------------------------------- bad input


def test_bad_input():
    layer = SPLoRALinear(4, 3, rank=1)
    with pytest.raises(ValueError, match="method"):
        stored_parameters(layer, method="pruning")
    with pytest.raises(ValueError, match="method"):
        layer_stored_parameters(layer, method="fine_pruning")
    for function in (stored_parameters, stored_parameters_by_layer):
        with pytest.raises(ValueError, match="no SPA layers"):
            function(nn.Linear(4, 3))
        with pytest.raises(TypeError, match="model"):
            function("model")
    with pytest.raises(ValueError, match="no SPA layers"):
        active_macs(nn.Linear(4, 3), torch.randn(2, 4))
    with pytest.raises(TypeError, match="example_inputs"):
        active_macs(layer, 3.0)
    assert len(layer._forward_hooks) == 0
