"""``spa_kernels.nn.SPLoPALinear``: interchange with sp_adapters, masks, conversion and scoped sharing."""

from __future__ import annotations

import pytest
import sp_adapters
import torch
from torch import nn

import spa_kernels
from spa_kernels.nn import SPLoPALinear, SPLoPASharing

SHAPE = {"in_features": 48, "out_features": 40, "num_prototypes": 4, "block_shape": (8, 6), "prototype_rank": 2}


def _dense_mask(layer: SPLoPALinear) -> torch.Tensor:
    p, q = layer.block_shape
    return torch.kron(layer.block_mask.float(), torch.ones(p, q))


def _sp_adapters_masked(theirs, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What sp_adapters computes with the block mask applied to its adapted weight (it never masks in forward)."""
    return nn.functional.linear(x, theirs.adapted_weight * mask, theirs.bias)


def test_equal_seeds_give_equal_layers():
    torch.manual_seed(3)
    theirs = sp_adapters.SPLoPALinear(**SHAPE, shared_prototypes=False)
    torch.manual_seed(3)
    ours = SPLoPALinear(**SHAPE, shared_prototypes=False)
    state_theirs, state_ours = theirs.state_dict(), ours.state_dict()
    assert set(state_ours) - set(state_theirs) == {"block_mask"}
    for key, value in state_theirs.items():
        assert torch.equal(state_ours[key], value), key


def test_state_dict_from_sp_adapters_loads_strictly_and_matches():
    theirs = sp_adapters.SPLoPALinear(**SHAPE, shared_prototypes=False, init_range=0.5)
    ours = SPLoPALinear(**SHAPE)
    ours.set_masks(torch.rand(5, 8) < 0.5)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert bool(ours.block_mask.all())  # no mask in an sp_adapters checkpoint: every block active
    x = torch.randn(3, 7, 48)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_state_dict_to_sp_adapters_loads_with_only_the_mask_unexpected():
    ours = SPLoPALinear(**SHAPE, init_range=0.5)
    theirs = sp_adapters.SPLoPALinear(**SHAPE, shared_prototypes=False)
    result = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == ["block_mask"]
    x = torch.randn(9, 48)
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)
    mask = torch.rand(5, 8) < 0.4
    ours.set_masks(mask)
    torch.testing.assert_close(ours(x), _sp_adapters_masked(theirs, _dense_mask(ours), x), rtol=1e-5, atol=1e-5)


def test_from_sp_adapters_layer_copies_the_adapter():
    theirs = sp_adapters.SPLoPALinear(**SHAPE, shared_prototypes=False, init_range=0.5)
    ours = SPLoPALinear.from_module(theirs, scale=1.0)
    assert ours.num_prototypes == 4 and ours.block_shape == (8, 6) and ours.prototype_rank == 2
    x = torch.randn(4, 48)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert not ours.weight.requires_grad


def test_from_linear_and_from_itself_keep_the_mask():
    base = nn.Linear(48, 40)
    layer = SPLoPALinear.from_module(base, num_prototypes=4, block_shape=(8, 6), init_range=0.5)
    assert torch.equal(layer.weight, base.weight) and torch.equal(layer.bias, base.bias)
    mask = torch.rand(5, 8) < 0.5
    layer.set_masks(mask)
    again = SPLoPALinear.from_module(layer)
    assert torch.equal(again.block_mask, mask)
    x = torch.randn(6, 48)
    torch.testing.assert_close(again(x), layer(x))


@pytest.mark.parametrize("density", [1.0, 0.5, 0.0])
def test_to_module_and_compact_give_the_same_outputs(density):
    layer = SPLoPALinear(48, 48, num_prototypes=3, block_shape=(8, 8), init_range=0.5)
    layer.set_masks(torch.rand(6, 6) < density if density < 1 else None)
    x = torch.randn(5, 48)
    y = layer(x)
    torch.testing.assert_close(layer.to_module()(x), y, rtol=1e-5, atol=1e-5)
    dense = layer.compact("dense")
    bsr = layer.compact()
    assert bsr.layout == torch.sparse_bsr and bsr.values().shape[0] == int(layer.block_mask.sum())
    torch.testing.assert_close(bsr.to_dense(), dense)
    torch.testing.assert_close(torch.addmm(layer.bias, x, dense.t()), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.mm(bsr, x.t()).t() + layer.bias, y, rtol=1e-5, atol=1e-5)


def test_masked_gradients():
    layer = SPLoPALinear(**SHAPE, init_range=0.5)
    mask = torch.rand(5, 8) < 0.5
    layer.set_masks(mask)
    layer(torch.randn(3, 48)).sum().backward()
    assert layer.weight.grad is None
    assert torch.all(layer.adapter.pos_weights.grad[:, ~mask] == 0)
    assert layer.adapter.pos_weights.grad[:, mask].abs().sum() > 0
    assert layer.adapter.prototypes.rows.grad.abs().sum() > 0 and layer.adapter.prototypes.cols.grad.abs().sum() > 0


def test_set_masks_rejects_bad_masks():
    layer = SPLoPALinear(**SHAPE)
    with pytest.raises(ValueError, match="block_mask must have shape"):
        layer.set_masks(torch.ones(8, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="torch.bool"):
        layer.set_masks(torch.ones(5, 8))


def test_constructor_rejects_indivisible_shapes():
    with pytest.raises(ValueError, match="not divisible by block_shape"):
        SPLoPALinear(50, 40, block_shape=(8, 6))


def test_sharing_is_scoped():
    lone_a, lone_b = SPLoPALinear(**SHAPE), SPLoPALinear(**SHAPE)
    assert lone_a.adapter.prototypes is not lone_b.adapter.prototypes
    sharing = SPLoPASharing()
    a = SPLoPALinear(**SHAPE, sharing=sharing)
    b = SPLoPALinear(**{**SHAPE, "in_features": 24}, sharing=sharing)
    assert a.adapter.prototypes is b.adapter.prototypes
    assert a.adapter.pos_weights is not b.adapter.pos_weights


def _mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32), nn.Linear(32, 5))


def test_convert_shares_within_one_model_only():
    base = _mlp()
    first = spa_kernels.convert_splopa(base, num_prototypes=4, block_shape=(16, 16))
    second = spa_kernels.convert_splopa(base, num_prototypes=4, block_shape=(16, 16))
    assert isinstance(first[0], SPLoPALinear) and isinstance(first[2], SPLoPALinear)
    assert type(first[3]) is nn.Linear  # 5 outputs: not divisible by 16, left unchanged
    assert first[0].adapter.prototypes is first[2].adapter.prototypes
    assert first[0].adapter.prototypes is not second[0].adapter.prototypes
    assert type(base[0]) is nn.Linear  # not in place by default
    x = torch.randn(4, 32)
    torch.testing.assert_close(first(x), base(x), rtol=1e-2, atol=1e-2)  # init_range 1e-4: close to the base


def test_convert_keeps_sp_adapters_sharing_and_outputs():
    theirs = sp_adapters.SPLoPA(_mlp()[:3], num_prototypes=4, block_shape=(16, 16), init_range=0.3)
    assert theirs[0].adapter.prototypes is theirs[2].adapter.prototypes
    ours = spa_kernels.convert_splopa(theirs)
    assert isinstance(ours[0], SPLoPALinear)
    assert ours[0].adapter.prototypes is ours[2].adapter.prototypes
    assert ours[0].adapter.prototypes is not theirs[0].adapter.prototypes
    x = torch.randn(4, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    theirs.load_state_dict(ours.state_dict(), strict=False)


def test_awkward_shapes_match_the_merged_weight():
    layer = SPLoPALinear(21, 10, num_prototypes=1, block_shape=(5, 7), prototype_rank=3, init_range=1.0)
    layer.set_masks(torch.tensor([[True, False, True], [False, False, True]]))
    x = torch.randn(2, 3, 21)
    torch.testing.assert_close(layer(x), layer.to_module()(x), rtol=1e-5, atol=1e-5)
