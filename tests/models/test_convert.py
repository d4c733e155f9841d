"""spa_kernels.convert: every supported layer replaced, nothing else touched."""

from __future__ import annotations

import logging

import pytest
import sp_adapters
import torch
from torch import nn

import spa_kernels
from spa_kernels import backend as backend_policy
from spa_kernels.nn import SPLoRAConv1d, SPLoRAConv2d, SPLoRALinear, SPPaRAConv2d

BACKENDS = spa_kernels.backends("cpu")
CONV_BACKENDS = [name for name in BACKENDS if backend_policy.get(name).implements("splora_conv")
                 and backend_policy.get(name).implements("sppara_conv")]


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

    class CustomAttention(nn.MultiheadAttention):
        pass

    model = nn.Sequential(CustomAttention(8, 2), ScaledLinear(8, 8), nn.Linear(8, 8))
    with caplog.at_level(logging.WARNING, logger="spa_kernels"):
        converted = spa_kernels.convert(model)
    assert type(converted[0].out_proj) is type(model[0].out_proj)
    assert type(converted[1]) is ScaledLinear
    assert isinstance(converted[2], SPLoRALinear)
    assert "CustomAttention" in caplog.text and "ScaledLinear" in caplog.text


def test_convert_rejects_non_modules():
    with pytest.raises(TypeError, match="model"):
        spa_kernels.convert([nn.Linear(2, 2)])


# ----------------------------------------------------------------------------- convolutions


class SmallCNN(nn.Module):
    """Conv-BatchNorm-ReLU blocks and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        )
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def make_cnn() -> nn.Module:
    model = SmallCNN()
    with torch.no_grad():  # running statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def zero_adapters(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SPPaRAConv2d):
                m.adapter.zero_()
            elif hasattr(m, "adapter") and hasattr(m.adapter, "cols"):
                m.adapter.cols.zero_()


@pytest.mark.parametrize("conv_adapter, conv_type", [("splora", SPLoRAConv2d), ("sppara", SPPaRAConv2d)])
@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_cnn_convs_and_linears_replaced_and_outputs_kept_at_zero_adapter(backend, conv_adapter, conv_type):
    if backend == "triton" and conv_adapter == "sppara":
        pytest.skip("the Triton interpreter is slow; the splora case covers the kernels' module path")
    model = make_cnn()
    converted = spa_kernels.convert(model, rank=4, backend=backend, conv_adapter=conv_adapter)
    assert linear_names(converted, nn.Conv2d) == [] and linear_names(converted, nn.Linear) == []
    assert linear_names(converted, conv_type) == linear_names(model, nn.Conv2d) == ["features.0", "features.3"]
    assert linear_names(converted, SPLoRALinear) == ["head"]
    assert type(converted.features[1]) is nn.BatchNorm2d
    for name in ("features.0", "features.3"):
        ours, original = converted.get_submodule(name), model.get_submodule(name)
        assert torch.equal(ours.weight, original.weight) and ours.weight.requires_grad is False
        assert ours.stride == original.stride and ours.padding == original.padding
        assert ours.backend == backend and ours.training is False
    if conv_adapter == "splora":
        assert converted.features[0].rank == 4

    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        assert_close(converted(x), expected, "default init_range", tol=1e-2)
        zero_adapters(converted)
        assert_close(converted(x), expected, "adapters zero")


def test_trainable_parameters_of_a_converted_cnn():
    model = spa_kernels.convert(make_cnn(), rank=2, conv_adapter="sppara")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "features.0.bias", "features.0.adapter", "features.1.weight", "features.1.bias",
        "features.3.adapter", "features.4.weight", "features.4.bias",
        "head.bias", "head.adapter.rows", "head.adapter.cols",
    }
    assert model.features[0].adapter.shape == (8, 3)


@pytest.mark.parametrize("conv_adapter", ["lora", "SPPaRA", None, 1])
def test_bad_conv_adapter_raises(conv_adapter):
    with pytest.raises(ValueError, match="conv_adapter"):
        spa_kernels.convert(make_cnn(), conv_adapter=conv_adapter)


def test_even_kernel_and_conv_subclasses_are_left_alone(caplog):
    class ScaledConv(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Conv2d(3, 4, 2), ScaledConv(4, 4, 3), nn.Conv1d(4, 4, (4,)), nn.Conv2d(4, 4, 3))
    with caplog.at_level(logging.WARNING, logger="spa_kernels"):
        converted = spa_kernels.convert(model)
    assert type(converted[0]) is nn.Conv2d and type(converted[1]) is ScaledConv and type(converted[2]) is nn.Conv1d
    assert isinstance(converted[3], SPLoRAConv2d)
    assert "'0'" in caplog.text and "kernel_size=(2, 2)" in caplog.text
    assert "kernel_size=(4,)" in caplog.text and "ScaledConv" in caplog.text


def test_depthwise_conv_is_converted_and_runs_on_the_reference_backend(caplog, monkeypatch):
    model = nn.Sequential(nn.Conv1d(6, 6, 3, padding=1, groups=6), nn.Conv1d(6, 4, 1)).eval()
    backend = "cpu" if "cpu" in CONV_BACKENDS else None
    with caplog.at_level(logging.WARNING, logger="spa_kernels"):
        converted = spa_kernels.convert(model, rank=2, backend=backend)
    assert isinstance(converted[0], SPLoRAConv1d) and converted[0].groups == 6
    assert converted[0].adapter.rows.shape == (1, 2, 1)
    assert converted[0].backend is None and converted[1].backend == backend
    if backend is not None:
        assert "groups=6" in caplog.text
    zero_adapters(converted)
    x = torch.randn(2, 6, 9)
    monkeypatch.setattr(spa_kernels.functional.conv, "_grouped_warning_given", False)
    with pytest.warns(UserWarning, match="groups=6"), torch.no_grad():
        y = converted(x)
    with torch.no_grad():
        assert_close(y, model(x), "depthwise model")


def test_sp_adapters_cnn_keeps_its_conv_adapters():
    torch.manual_seed(2)
    splora = sp_adapters.SPLoRA(make_cnn(), rank=3)
    sppara = sp_adapters.SPPaRA(make_cnn())
    for theirs in (splora, sppara):
        with torch.no_grad():
            for m in theirs.modules():
                if isinstance(m, sp_adapters.SPPaRAConv2d):
                    m.adapter.normal_()
                elif isinstance(m, (sp_adapters.SPLoRAConv2d, sp_adapters.SPLoRALinear)):
                    m.adapter.cols.normal_()
    ours = spa_kernels.convert(splora, rank=5, conv_adapter="sppara")
    assert linear_names(ours, SPLoRAConv2d) == linear_names(splora, sp_adapters.SPLoRAConv2d)
    assert ours.features[3].rank == 3 and torch.equal(ours.features[3].adapter.cols, splora.features[3].adapter.cols)
    ours_para = spa_kernels.convert(sppara, rank=5)
    assert linear_names(ours_para, SPPaRAConv2d) == linear_names(sppara, sp_adapters.SPPaRAConv2d)
    assert torch.equal(ours_para.features[0].adapter, sppara.features[0].adapter)
    assert isinstance(ours_para.head, SPLoRALinear)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_close(ours(x), splora(x), "vs sp_adapters SPLoRA cnn")
        assert_close(ours_para(x), ours_para.head(sppara.features(x).mean(dim=(2, 3))), "vs sp_adapters SPPaRA cnn")
