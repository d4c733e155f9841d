"""Channel-importance criteria against scores computed by hand in float64.

Every expected value is built here from the layer's parameters with plain torch
(a dense adapted weight, ``F.linear`` / ``F.conv2d``); the losses are
``sum(a · c)`` with a fixed ``c``, so ``∂L/∂a = c`` is known exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.pruning_models import ResidualCNN, residual_cnn_input
from torch import nn

import spa_kernels
from spa_kernels.nn import SPLoRAConv2d, SPLoRALinear, SPPaRAConv2d
from spa_kernels.pruning import criteria
from spa_kernels.pruning.criteria import (
    ActivationCriterion,
    GradientCriterion,
    MagnitudeCriterion,
    TaylorCriterion,
)

F64 = torch.float64


def _randomise(layer: nn.Module) -> nn.Module:
    """Adapter of the same scale as the weight, so a wrong adapter term shows."""
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(torch.randn_like(param))
    return layer


def _linear(in_features=5, out_features=4, rank=2, scale=0.5) -> SPLoRALinear:
    return _randomise(SPLoRALinear(in_features, out_features, rank=rank, scale=scale, dtype=F64))


def _dense_linear_weight(layer: SPLoRALinear) -> torch.Tensor:
    """``W + s·B A`` with pruned inputs zeroed, built densely."""
    weight = layer.weight + layer.scale * layer.adapter.cols[0] @ layer.adapter.rows[0]
    return (weight * layer.in_mask).detach()


def _linear_output(layer: SPLoRALinear, x: torch.Tensor) -> torch.Tensor:
    return (F.linear(x, _dense_linear_weight(layer), layer.bias.detach()) * layer.out_mask).detach()


def _dense_conv_weight(layer: nn.Module) -> torch.Tensor:
    """Adapted convolution weight (adapter at the centre tap), pruned inputs zeroed; groups = 1."""
    weight = layer.weight.detach().clone()
    if isinstance(layer, SPPaRAConv2d):
        term = layer.adapter.detach()
    else:
        term = layer.scale * (layer.adapter.cols[0] @ layer.adapter.rows[0]).detach()
    kh, kw = layer.kernel_size
    weight[:, :, kh // 2, kw // 2] += term
    return weight * layer.in_mask.view(1, -1, 1, 1)


def _conv_output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = F.conv2d(x, _dense_conv_weight(layer), layer.bias.detach(), layer.stride, layer.padding)
    return y * layer.out_mask.view(1, -1, 1, 1)


def _backward_feed(inputs, weights):
    """A feed running ``sum(model(x) · c)`` forward and backward for each (x, c)."""

    def feed(model):
        for x, c in zip(inputs, weights, strict=True):
            (model(x) * c).sum().backward()

    return feed


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == F64 and actual.device.type == "cpu"
    assert actual.shape == expected.shape
    error = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, rtol=1e-10, atol=1e-12), f"max error {error}\n{actual}\n{expected}"


# ---------------------------------------------------------------------------- data criteria


def test_linear_scores_by_hand():
    torch.manual_seed(0)
    layer = _linear()
    x = torch.randn(6, 5, dtype=F64)
    c = torch.randn(6, 4, dtype=F64)
    a = _linear_output(layer, x)
    feed = _backward_feed([x], [c])

    _assert_close(ActivationCriterion().collect(layer, feed)[""], a.square().mean(0))
    _assert_close(ActivationCriterion(p=1).collect(layer, feed)[""], a.abs().mean(0))
    _assert_close(ActivationCriterion(p=3.5).collect(layer, feed)[""], a.abs().pow(3.5).mean(0))
    _assert_close(GradientCriterion().collect(layer, feed)[""], c.abs().mean(0))
    _assert_close(TaylorCriterion().collect(layer, feed)[""], (a * c).abs().mean(0))


def test_linear_positions_are_averaged_per_sample_before_the_absolute_value():
    torch.manual_seed(1)
    layer = _linear()
    x = torch.randn(3, 7, 5, dtype=F64)  # (N, T, C): T positions per sample
    c = torch.randn(3, 7, 4, dtype=F64)
    a = _linear_output(layer, x)
    feed = _backward_feed([x], [c])

    _assert_close(ActivationCriterion().collect(layer, feed)[""], a.square().mean((0, 1)))
    _assert_close(GradientCriterion().collect(layer, feed)[""], c.mean(1).abs().mean(0))
    _assert_close(TaylorCriterion().collect(layer, feed)[""], (a * c).mean(1).abs().mean(0))


def test_conv_scores_by_hand():
    torch.manual_seed(2)
    layer = _randomise(SPLoRAConv2d(3, 4, 3, stride=2, padding=1, rank=2, scale=0.7, dtype=F64))
    layer.set_masks(in_mask=torch.tensor([True, False, True]))
    x = torch.randn(2, 3, 6, 5, dtype=F64)
    c = torch.randn(2, 4, 3, 3, dtype=F64)
    a = _conv_output(layer, x)
    feed = _backward_feed([x], [c])

    _assert_close(ActivationCriterion().collect(layer, feed)[""], a.square().mean((0, 2, 3)))
    _assert_close(GradientCriterion().collect(layer, feed)[""], c.mean((2, 3)).abs().mean(0))
    _assert_close(TaylorCriterion().collect(layer, feed)[""], (a * c).mean((2, 3)).abs().mean(0))


def test_unbatched_conv_output_is_one_sample():
    torch.manual_seed(3)
    layer = _randomise(SPPaRAConv2d(3, 4, 3, padding=1, dtype=F64))
    x = torch.randn(3, 5, 5, dtype=F64)
    c = torch.randn(4, 5, 5, dtype=F64)
    a = _conv_output(layer, x.unsqueeze(0))[0]
    feed = _backward_feed([x], [c])
    _assert_close(ActivationCriterion().collect(layer, feed)[""], a.square().mean((1, 2)))
    _assert_close(TaylorCriterion().collect(layer, feed)[""], (a * c).mean((1, 2)).abs())


@pytest.mark.parametrize("criterion_type", [ActivationCriterion, GradientCriterion, TaylorCriterion])
def test_two_batches_accumulate_to_the_concatenated_batch(criterion_type):
    torch.manual_seed(4)
    layer = _randomise(SPLoRAConv2d(2, 3, 3, padding=1, rank=1, dtype=F64))
    x = torch.randn(5, 2, 4, 4, dtype=F64)
    c = torch.randn(5, 3, 4, 4, dtype=F64)
    a = _conv_output(layer, x)
    expected = {
        ActivationCriterion: a.square().mean((0, 2, 3)),
        GradientCriterion: c.mean((2, 3)).abs().mean(0),
        TaylorCriterion: (a * c).mean((2, 3)).abs().mean(0),
    }[criterion_type]
    criterion = criterion_type()
    split = criterion.collect(layer, _backward_feed([x[:2], x[2:]], [c[:2], c[2:]]))[""]
    _assert_close(split, expected)
    # observing again without reset keeps accumulating: the same batches twice, same mean
    with criterion.observe(layer):
        _backward_feed([x], [c])(layer)
    _assert_close(criterion.scores()[""], expected)


def test_pruned_channels_score_zero_and_the_rest_are_unchanged():
    torch.manual_seed(5)
    layer = _linear()
    out_mask = torch.tensor([True, False, True, False])
    layer.set_masks(out_mask=out_mask, in_mask=torch.tensor([True, True, False, True, False]))
    x = torch.randn(4, 5, dtype=F64)
    c = torch.randn(4, 4, dtype=F64)  # nonzero gradient at the pruned outputs too
    a = _linear_output(layer, x)
    feed = _backward_feed([x], [c])
    expected = {
        "activation": a.square().mean(0),
        "gradient": c.abs().mean(0) * out_mask,
        "taylor": (a * c).abs().mean(0),
    }
    criteria_ = {"activation": ActivationCriterion(), "gradient": GradientCriterion(), "taylor": TaylorCriterion()}
    for key, criterion in criteria_.items():
        scores = criterion.collect(layer, feed)[""]
        _assert_close(scores, expected[key])
        assert torch.all(scores[~out_mask] == 0), key
        assert torch.all(scores[out_mask] > 0), key


class _InPlaceShiftThenReLU(nn.Module):
    """``relu(a + 1)`` computed in place on the layer output, as fused activations do."""

    def forward(self, a):
        return a.add_(1.0).relu_()


def test_taylor_sees_the_output_before_an_inplace_change():
    torch.manual_seed(6)
    layer = _randomise(SPLoRAConv2d(2, 4, 1, rank=2, dtype=F64))
    model = nn.Sequential(layer, _InPlaceShiftThenReLU())
    x = torch.randn(8, 2, 3, 3, dtype=F64)
    c = torch.randn(8, 4, 3, 3, dtype=F64)
    a = _conv_output(layer, x)  # the layer's own output, before the in-place change
    gradient = c * (a + 1 > 0)  # ∂L/∂a through the shift and the ReLU
    feed = _backward_feed([x], [c])
    _assert_close(TaylorCriterion().collect(model, feed)["0"], (a * gradient).mean((2, 3)).abs().mean(0))
    _assert_close(GradientCriterion().collect(model, feed)["0"], gradient.mean((2, 3)).abs().mean(0))


def test_layers_never_run_get_no_entry():
    torch.manual_seed(7)
    model = nn.ModuleDict({"used": _linear(), "unused": _linear()})
    x = torch.randn(2, 5, dtype=F64)

    def feed(m):
        m["used"](x).sum().backward()

    for criterion in (ActivationCriterion(), GradientCriterion(), TaylorCriterion()):
        assert set(criterion.collect(model, feed)) == {"used"}

    def forward_only(m):
        with torch.no_grad():
            m["used"](x)

    assert GradientCriterion().collect(model, forward_only) == {}
    assert set(ActivationCriterion().collect(model, forward_only)) == {"used"}


def test_hooks_are_removed_on_exit_and_on_error():
    torch.manual_seed(8)
    model = spa_kernels.convert(ResidualCNN(), rank=2)
    layers = [m for m in model.modules() if isinstance(m, spa_kernels.nn.ChannelMasked)]
    x = residual_cnn_input()
    for criterion in (ActivationCriterion(), GradientCriterion(), TaylorCriterion(), MagnitudeCriterion()):
        with criterion.observe(model):
            if not isinstance(criterion, MagnitudeCriterion):
                assert all(len(layer._forward_hooks) == 1 for layer in layers)
            model(x).sum().backward()
        assert all(len(layer._forward_hooks) == 0 for layer in layers)
        with pytest.raises(KeyError), criterion.observe(model):
            raise KeyError("inside observe")
        assert all(len(layer._forward_hooks) == 0 for layer in layers)


def test_a_backward_after_exit_is_not_counted_and_releases_the_activation():
    torch.manual_seed(9)
    layer = _linear()
    criterion = TaylorCriterion()
    x = torch.randn(2, 5, dtype=F64)
    with criterion.observe(layer):
        y = layer(x)
    assert y._backward_hooks in (None, {}) or len(y._backward_hooks) == 0
    y.sum().backward()
    assert criterion.scores() == {}


def test_reset_forgets_and_collect_resets():
    torch.manual_seed(10)
    layer = _linear()
    x = torch.randn(3, 5, dtype=F64)
    criterion = ActivationCriterion()
    with criterion.observe(layer):
        layer(2 * x)
    criterion.reset()
    assert criterion.scores() == {}
    with criterion.observe(layer):
        layer(2 * x)
    scores = criterion.collect(layer, lambda m: m(x))  # the 2x batch is forgotten
    _assert_close(scores[""], _linear_output(layer, x).square().mean(0))


@pytest.mark.parametrize("conv_adapter", ["splora", "sppara"])
def test_every_layer_of_a_converted_network_is_scored(conv_adapter):
    torch.manual_seed(11)
    model = spa_kernels.convert(ResidualCNN(), rank=2, conv_adapter=conv_adapter)
    x = residual_cnn_input()
    layers = spa_kernels.pruning._layers.spa_layers(model)
    for criterion in (ActivationCriterion(), GradientCriterion(), TaylorCriterion(), MagnitudeCriterion(p=1)):
        scores = criterion.collect(model, lambda m: F.cross_entropy(m(x), torch.tensor([0, 3])).backward())
        assert set(scores) == set(layers)
        for name, score in scores.items():
            assert score.shape == (layers[name].out_mask.numel(),)
            assert score.dtype == F64 and torch.isfinite(score).all() and (score >= 0).all()


# ---------------------------------------------------------------------------- magnitude


def _expected_magnitude(dense_rows: torch.Tensor, out_mask: torch.Tensor, p: int, normalize: bool):
    """Row norms of a dense ``(out, in, taps)`` adapted weight, pruned rows 0, optionally normalised."""
    raw = dense_rows.flatten(1).norm(p=p, dim=1) * out_mask
    return raw / raw.norm() if normalize else raw


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("normalize", [True, False])
def test_magnitude_of_a_linear_layer(p, normalize):
    torch.manual_seed(12)
    layer = _linear(7, 6, rank=3, scale=0.3)
    out_mask = torch.tensor([True, True, False, True, False, True])
    layer.set_masks(in_mask=torch.tensor([True, False, True, True, False, True, True]), out_mask=out_mask)
    expected = _expected_magnitude(_dense_linear_weight(layer), out_mask, p, normalize)
    criterion = MagnitudeCriterion(p=p, normalize=normalize)
    _assert_close(criterion.collect(layer, lambda m: None)[""], expected)
    _assert_close(criterion.scores(layer)[""], expected)


@pytest.mark.parametrize("layer_type", [SPLoRAConv2d, SPPaRAConv2d])
@pytest.mark.parametrize("p", [1, 2])
def test_magnitude_of_a_conv_layer_counts_every_tap(layer_type, p, monkeypatch):
    torch.manual_seed(13)
    kwargs = {"rank": 2, "scale": 1.5} if layer_type is SPLoRAConv2d else {}
    layer = _randomise(layer_type(4, 5, (3, 5), dtype=F64, **kwargs))
    out_mask = torch.tensor([True, False, True, True, True])
    layer.set_masks(in_mask=torch.tensor([False, True, True, False]), out_mask=out_mask)
    expected = _expected_magnitude(_dense_conv_weight(layer), out_mask, p, normalize=True)
    monkeypatch.setattr(criteria, "_MAGNITUDE_BLOCK_ELEMENTS", 2 * 4 * 15)  # blocks of two rows
    _assert_close(MagnitudeCriterion(p=p).collect(layer, lambda m: None)[""], expected)


def test_magnitude_of_a_grouped_conv_reads_each_rows_own_group():
    torch.manual_seed(14)
    layer = _randomise(SPLoRAConv2d(4, 6, 3, groups=2, rank=2, dtype=F64))
    in_mask = torch.tensor([True, False, False, True])
    out_mask = torch.tensor([True, True, False, True, True, True])
    layer.set_masks(in_mask=in_mask, out_mask=out_mask)
    weight = layer.weight.detach().clone()
    weight[:, :, 1, 1] += layer.scale * (layer.adapter.cols[0] @ layer.adapter.rows[0]).detach()
    for o in range(6):
        group = o // 3
        weight[o] *= in_mask[2 * group:2 * group + 2].view(2, 1, 1)
    expected = _expected_magnitude(weight, out_mask, 2, normalize=False)
    _assert_close(MagnitudeCriterion(normalize=False).scores(layer)[""], expected)


def test_magnitude_of_a_fully_pruned_layer_is_zero():
    layer = _linear()
    layer.set_masks(out_mask=torch.zeros(4, dtype=torch.bool))
    assert torch.equal(MagnitudeCriterion().scores(layer)[""], torch.zeros(4, dtype=F64))


# ---------------------------------------------------------------------------- bad input


def test_bad_input():
    plain = nn.Sequential(nn.Linear(3, 3))
    for criterion in (ActivationCriterion(), GradientCriterion(), TaylorCriterion(), MagnitudeCriterion()):
        with pytest.raises(ValueError, match="no SPA layers"), criterion.observe(plain):
            pass
        with pytest.raises(TypeError, match="model"), criterion.observe("model"):
            pass
        with pytest.raises(TypeError, match="feed"):
            criterion.collect(_linear(), feed=None)
    for p in (0, 3, 1.5, True, "2"):
        with pytest.raises(ValueError, match="p must be"):
            MagnitudeCriterion(p=p)
    for p in (0, -1.0, float("inf"), float("nan"), True, "2"):
        with pytest.raises(ValueError, match="p must be"):
            ActivationCriterion(p=p)
    with pytest.raises(RuntimeError, match="no model"):
        MagnitudeCriterion().scores()


def test_nested_observe_of_one_criterion_is_refused():
    criterion = ActivationCriterion()
    layer = _linear()
    with criterion.observe(layer):
        with pytest.raises(RuntimeError, match="already observing"), criterion.observe(layer):
            pass
    assert len(layer._forward_hooks) == 0
