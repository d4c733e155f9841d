"""Autocast: the SPA ops cast their operands like F.linear/F.conv*, and gradients keep the parameters' dtype."""

from __future__ import annotations

import pytest
import torch
from support.whole_models import HAS_TRANSFORMERS, hf_vit, hf_vit_input, logits
from torch import nn

import spa_kernels
from spa_kernels.nn import SPLoRAConv2d, SPLoRALinear, SPPaRAConv2d

DTYPES = [torch.bfloat16, torch.float16]


def masked(layer: nn.Module) -> nn.Module:
    layer.set_masks(torch.arange(layer.in_mask.numel()) % 3 != 1, torch.arange(layer.out_mask.numel()) % 4 != 2)
    return layer


def adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_linear_before_an_spa_layer(dtype):
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), masked(SPLoRALinear(16, 10, rank=3, init_range=0.5)))
    x = torch.randn(5, 12)
    with torch.autocast("cpu", dtype=dtype):
        y = model(x)
    assert y.dtype == dtype
    y.float().square().sum().backward()
    got = adapter_grads(model)
    assert {g.dtype for g in got.values()} == {torch.float32}
    assert {"2.adapter.rows", "2.adapter.cols", "2.bias", "0.weight"} <= set(got)

    # The same computation with every operand cast by hand, outside autocast.
    model.zero_grad()
    layer, first = model[2], model[0]
    h = torch.relu(nn.functional.linear(x.to(dtype), first.weight.to(dtype), first.bias.to(dtype)))
    want = spa_kernels.splora_linear(h, layer.weight.to(dtype), layer.adapter.rows[0].to(dtype),
                                     layer.adapter.cols[0].to(dtype), layer.bias.to(dtype),
                                     layer.in_idx, layer.out_idx, scale=layer.scale)
    assert torch.equal(y, want)
    want.float().square().sum().backward()
    for name, grad in adapter_grads(model).items():
        assert torch.equal(got[name], grad), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_spa_cnn_is_not_silently_left_in_float32(dtype):
    model = nn.Sequential(masked(SPLoRAConv2d(3, 8, 3, padding=1, rank=2, init_range=0.5)), nn.ReLU(),
                          masked(SPPaRAConv2d(8, 6, 3, init_range=0.5)))
    x = torch.randn(2, 3, 7, 7)
    with torch.autocast("cpu", dtype=dtype):
        y = model(x)
    assert y.dtype == dtype
    reference = model(x)
    error = (y.float() - reference).abs().max().item()
    print(f"{dtype}: max error against float32 {error:.3e}")
    assert 0 < error < 0.1 * reference.abs().max().item()
    y.float().sum().backward()
    assert model[0].adapter.rows.grad.dtype == torch.float32 and model[2].adapter.grad.dtype == torch.float32


def test_functional_op_with_index_lists_and_float64_left_alone():
    x, weight = torch.randn(4, 9), torch.randn(7, 9)
    a, b = torch.randn(2, 9, requires_grad=True), torch.randn(7, 2, requires_grad=True)
    in_idx, out_idx = torch.tensor([0, 2, 5, 8]), torch.tensor([1, 3, 6])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = spa_kernels.splora_linear(x, weight, a, b, None, in_idx, out_idx)
        y64 = spa_kernels.splora_linear(x.double(), weight.double(), a.double(), b.double(), None, in_idx, out_idx)
    assert y.dtype == torch.bfloat16 and y64.dtype == torch.float64
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
def test_converted_hugging_face_vit_trains_under_bf16_autocast():
    model = spa_kernels.convert(hf_vit(), rank=2, exclude=["classifier"]).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = logits(model(hf_vit_input()))
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.dtype == torch.float32 for g in grads.values()), \
        [name for name, g in grads.items() if g is None]
