"""spa_kernels.convert: every supported layer replaced, nothing else touched."""

from __future__ import annotations

import logging

import pytest
import sp_adapters
import torch
from torch import nn

import spa_kernels
from spa_kernels.nn import SPLoRALinear

BACKENDS = spa_kernels.backends("cpu")


class Block(nn.Module):
    """A layer held as a plain attribute and a ModuleDict, not only in a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 24)
        self.heads = nn.ModuleDict({"a": nn.Linear(24, 8), "b": nn.Linear(24, 8, bias=False)})
        self.norm = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.proj(self.norm(x)))
        return self.heads["a"](h) + self.heads["b"](h)


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(12, 16),
        nn.GELU(),
        Block(),
        nn.ModuleList([nn.Linear(8, 8)]),
        nn.Linear(8, 5),
    )


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = model[2](model[1](model[0](x)))
    return model[4](model[3][0](h))


def linear_names(model: nn.Module, kind: type) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) is kind]


def zero_adapter_cols(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SPLoRALinear):
                m.adapter.cols.zero_()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    err = (actual.double() - expected.double()).abs().max().item()
    print(f"{what}: max abs error {err:.3e}")
    assert err <= tol * max(expected.abs().max().item(), 1.0), what


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_linear_replaced_and_outputs_kept_at_zero_adapter(backend):
    model = make_model()
    names = linear_names(model, nn.Linear)
    assert len(names) == 6
    converted = spa_kernels.convert(model, rank=4, backend=backend)

    assert linear_names(converted, nn.Linear) == []
    assert linear_names(converted, SPLoRALinear) == names
    assert type(converted[1]) is nn.GELU and type(converted[2].norm) is nn.LayerNorm
    assert linear_names(model, nn.Linear) == names, "inplace=False must leave the model alone"
    for name in names:
        ours, original = converted.get_submodule(name), model.get_submodule(name)
        assert torch.equal(ours.weight, original.weight)
        assert ours.weight.data_ptr() != original.weight.data_ptr()
        assert ours.rank == 4 and ours.backend == backend and ours.weight.requires_grad is False

    x = torch.randn(2, 3, 12)
    with torch.no_grad():
        expected = run(model, x)
        assert_close(run(converted, x), expected, "default init_range", tol=1e-2)
        zero_adapter_cols(converted)
        assert_close(run(converted, x), expected, "adapter cols zero")


def test_inplace_converts_the_model_itself():
    model = make_model()
    block = model[2]
    result = spa_kernels.convert(model, rank=2, inplace=True)
    assert result is model and model[2] is block
    assert isinstance(model[0], SPLoRALinear) and isinstance(block.heads["b"], SPLoRALinear)
    assert block.heads["b"].bias is None


def test_a_linear_root_is_replaced_and_returned():
    linear = nn.Linear(6, 4)
    result = spa_kernels.convert(linear, rank=2, inplace=True)
    assert isinstance(result, SPLoRALinear) and type(linear) is nn.Linear


def test_converting_twice_changes_nothing():
    model = spa_kernels.convert(make_model(), rank=3)
    layers = [m for m in model.modules() if isinstance(m, SPLoRALinear)]
    cols = [m.adapter.cols.clone() for m in layers]
    again = spa_kernels.convert(model, rank=7, inplace=True)
    assert [m for m in again.modules() if isinstance(m, SPLoRALinear)] == layers
    assert all(torch.equal(m.adapter.cols, c) and m.rank == 3 for m, c in zip(layers, cols, strict=True))


def test_sp_adapters_model_keeps_its_adapters():
    torch.manual_seed(1)
    theirs = sp_adapters.SPLoRA(make_model(), rank=3)
    with torch.no_grad():
        for m in theirs.modules():
            if isinstance(m, sp_adapters.SPLoRALinear):
                m.adapter.cols.normal_()
    ours = spa_kernels.convert(theirs, rank=5)
    assert linear_names(ours, SPLoRALinear) == linear_names(theirs, sp_adapters.SPLoRALinear)
    for name in linear_names(ours, SPLoRALinear):
        mine, source = ours.get_submodule(name), theirs.get_submodule(name)
        assert mine.rank == 3
        assert torch.equal(mine.adapter.rows, source.adapter.rows)
        assert torch.equal(mine.adapter.cols, source.adapter.cols)
    x = torch.randn(4, 12)
    with torch.no_grad():
        assert_close(run(ours, x), run(theirs, x), "vs sp_adapters model")
    assert ours.state_dict().keys() - theirs.state_dict().keys() == {
        f"{name}.{mask}" for name in linear_names(ours, SPLoRALinear) for mask in ("in_mask", "out_mask")
    }


def test_rank_fraction_scale_and_trainable_parameter_count():
    model = spa_kernels.convert(make_model(), rank=0.5, scale=2.0)
    expected = 0
    for m in model.modules():
        if isinstance(m, SPLoRALinear):
            assert m.rank == round(m.out_features * 0.5) and m.scale == 2.0
            expected += m.rank * (m.in_features + m.out_features) + (m.out_features if m.bias is not None else 0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layer_norm = 2 * 16
    assert trainable == expected + layer_norm


def test_dtype_device_and_training_mode_are_kept():
    model = make_model().double().eval()
    converted = spa_kernels.convert(model)
    for m in converted.modules():
        if isinstance(m, SPLoRALinear):
            assert m.training is False
            assert {p.dtype for p in m.parameters()} == {torch.float64}
            assert m.in_mask.device == m.weight.device


def test_multihead_attention_and_linear_subclasses_are_left_alone(caplog):
    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.MultiheadAttention(8, 2), ScaledLinear(8, 8), nn.Linear(8, 8))
    with caplog.at_level(logging.WARNING, logger="spa_kernels"):
        converted = spa_kernels.convert(model)
    assert type(converted[0].out_proj) is type(model[0].out_proj)
    assert type(converted[1]) is ScaledLinear
    assert isinstance(converted[2], SPLoRALinear)
    assert "MultiheadAttention" in caplog.text and "ScaledLinear" in caplog.text


def test_convert_rejects_non_modules():
    with pytest.raises(TypeError, match="model"):
        spa_kernels.convert([nn.Linear(2, 2)])
