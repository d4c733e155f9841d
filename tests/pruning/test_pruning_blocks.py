"""Block pruning of SPLoPA layers: scores, schedules and accounting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import spa_kernels
from spa_kernels.pruning.block_pruning import (
    BlockMovement,
    adapted_blocks,
    iterative_block_prune,
    magnitude_scores,
    prune_blocks,
    splopa_active_flops,
    splopa_stored_parameters,
)


def _model():
    base = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    return spa_kernels.convert_splopa(base, num_prototypes=3, block_shape=(8, 8), init_range=0.5)


def test_magnitude_is_the_norm_of_the_adapted_block():
    layer = _model()[0]
    merged = layer.to_module().weight.detach()  # all blocks active: the merged weight
    blocks = merged.view(6, 8, 4, 8).permute(0, 2, 1, 3)
    torch.testing.assert_close(magnitude_scores(layer), blocks.flatten(2).norm(dim=2))
    torch.testing.assert_close(adapted_blocks(layer), blocks)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_one_shot_prune_reaches_the_density_and_keeps_the_largest(scope):
    model = _model()
    before = {i: magnitude_scores(model[i]) for i in (0, 2)}
    densities = prune_blocks(model, 0.5, scope=scope, min_blocks=0)
    total = sum(int(model[i].block_mask.sum()) for i in (0, 2))
    assert total == 18
    if scope == "layer":
        assert densities == {"0": 0.5, "2": 0.5}
        for i in (0, 2):
            kept, dropped = before[i][model[i].block_mask], before[i][~model[i].block_mask]
            assert kept.min() >= dropped.max()
    else:
        kept = torch.cat([before[i][model[i].block_mask] for i in (0, 2)])
        dropped = torch.cat([before[i][~model[i].block_mask] for i in (0, 2)])
        assert kept.min() >= dropped.max()
    y = model(torch.randn(3, 32))
    assert torch.isfinite(y).all()


def test_iterative_prune_never_revives_blocks_and_fine_tunes():
    model = _model()
    calls = []
    masks = []

    def fine_tune(m):
        calls.append(1)
        masks.append(m[0].block_mask.clone())

    schedule = iterative_block_prune(model, 0.25, steps=3, scope="layer", fine_tune=fine_tune)
    assert len(calls) == 3 and schedule[-1] == pytest.approx(0.25)
    for earlier, later in zip(masks, masks[1:], strict=False):
        assert not (later & ~earlier).any()
    assert int(model[0].block_mask.sum()) == round(0.25 * 24)


def test_movement_scores_accumulate_minus_weight_times_gradient():
    model = _model()
    layer = model[0]
    x = torch.randn(5, 32)
    with BlockMovement(model) as movement:
        model(x).square().sum().backward()
        grad = layer.weight.grad.clone()
        movement.accumulate()
        assert layer.weight.grad is None
    assert not layer.weight.requires_grad
    expected = -(adapted_blocks(layer) * grad.view(6, 8, 4, 8).permute(0, 2, 1, 3)).flatten(2).sum(2)
    torch.testing.assert_close(movement("0", layer), expected)
    prune_blocks(model, 0.5, movement, scope="layer")
    assert int(layer.block_mask.sum()) == 12


def test_accounting_counts_prototypes_once():
    model = _model()
    prototypes = model[0].adapter.prototypes
    assert prototypes is model[2].adapter.prototypes
    once = prototypes.rows.numel() + prototypes.cols.numel()
    assert splopa_stored_parameters(model) == 3 * (24 + 12) + 48 + 16 + once
    prune_blocks(model, 0.5, scope="layer")
    assert splopa_stored_parameters(model) == 3 * (12 + 6) + 48 + 16 + once
    assert splopa_active_flops(model, tokens=10) == 2 * 10 * 64 * (12 + 6)


def test_min_blocks_keeps_a_layer_alive():
    model = _model()
    with torch.no_grad():
        model[2].weight.mul_(1e-6)
        model[2].adapter.pos_weights.mul_(1e-6)
    prune_blocks(model, 0.1, scope="global", min_blocks=2)
    assert int(model[2].block_mask.sum()) == 2


def test_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="density"):
        prune_blocks(model, 1.5)
    with pytest.raises(ValueError, match="scope"):
        prune_blocks(model, 0.5, scope="row")
    with pytest.raises(ValueError, match="no SPLoPALinear"):
        prune_blocks(nn.Linear(4, 4), 0.5)
