"""Pruning schedules: densities reached, ranking, min_channels/round_to, masks only shrink, rounds.

Groups of the MLPs are written by hand (identity channel maps), so these tests do not
depend on the dependency tracing; one test uses channel_groups on the residual CNN.
Expected kept channels come from hand-chosen scores.
"""

from __future__ import annotations

import math

import pytest
import torch
from support.pruning_models import ResidualCNN, TinyMLP, one_torch_thread, residual_cnn_input  # noqa: F401 (fixture)
from torch import Tensor, nn

from spa_kernels import convert
from spa_kernels.pruning._layers import spa_layers
from spa_kernels.pruning.groups import ChannelGroup, ChannelMap, channel_groups
from spa_kernels.pruning.schedule import PruneReport, iterative_prune, prune, round_densities

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def identity_map(channels: int) -> ChannelMap:
    return ChannelMap(torch.arange(channels), torch.arange(channels), channels)


def mlp_groups(hidden: int) -> list[ChannelGroup]:
    """TinyMLP's two hidden groups: fc1 → fc2 and fc2 → head."""
    return [ChannelGroup(hidden, {"fc1": identity_map(hidden)}, {"fc2": identity_map(hidden)}),
            ChannelGroup(hidden, {"fc2": identity_map(hidden)}, {"head": identity_map(hidden)})]


def mlp(hidden: int = 16) -> nn.Module:
    return convert(TinyMLP(hidden=hidden), rank=1)


def mask(indices, size: int) -> Tensor:
    out = torch.zeros(size, dtype=torch.bool)
    out[list(indices)] = True
    return out


class FixedCriterion:
    """Stand-in criterion: returns the same scores each round and counts its calls."""

    def __init__(self, scores: dict[str, Tensor]):
        self.scores = scores
        self.calls = 0

    def collect(self, model: nn.Module, feed) -> dict[str, Tensor]:
        self.calls += 1
        feed(model)
        return {name: value.clone() for name, value in self.scores.items()}


# --------------------------------------------------------------------------------------------------
# One-shot pruning


def test_layer_ranking_keeps_each_groups_best_channels():
    model = mlp()
    scores = {"fc1": torch.arange(16.0), "fc2": torch.arange(16.0).flip(0)}
    report = prune(model, scores, 0.5, mlp_groups(16), ranking="layer")
    assert torch.equal(model.fc1.out_mask, mask(range(8, 16), 16))
    assert torch.equal(model.fc2.in_mask, mask(range(8, 16), 16))
    assert torch.equal(model.fc2.out_mask, mask(range(8), 16))
    assert torch.equal(model.head.in_mask, mask(range(8), 16))
    assert report.kept == {"fc1": 8, "fc2": 8} and report.sizes == {"fc1": 16, "fc2": 16}
    assert report.density == 0.5 and report.target == 0.5


def test_global_ranking_uses_one_threshold_across_groups():
    model = mlp()
    # every fc1 channel outscores every fc2 channel: 16 of 32 kept = fc2's best one + fc1's best 15
    scores = {"fc1": 100 + torch.arange(16.0), "fc2": torch.arange(16.0)}
    report = prune(model, scores, 0.5, mlp_groups(16), ranking="global")
    assert report.kept == {"fc1": 15, "fc2": 1}
    assert torch.equal(model.fc1.out_mask, mask(range(1, 16), 16))
    assert torch.equal(model.fc2.out_mask, mask([15], 16))
    layer = mlp()
    assert prune(layer, scores, 0.5, mlp_groups(16), ranking="layer").kept == {"fc1": 8, "fc2": 8}


def test_global_ranking_interleaves_by_score():
    model = mlp(hidden=4)
    scores = {"fc1": torch.tensor([0.9, 0.1, 0.5, 0.3]), "fc2": torch.tensor([0.2, 0.8, 0.4, 0.7])}
    # best four of all eight: 0.9 (fc1 0), 0.8 (fc2 1), 0.7 (fc2 3), 0.5 (fc1 2)
    report = prune(model, scores, 0.5, mlp_groups(4), ranking="global", min_channels=0)
    assert report.kept == {"fc1": 2, "fc2": 2}
    assert torch.equal(model.fc1.out_mask, mask([0, 2], 4))
    assert torch.equal(model.fc2.out_mask, mask([1, 3], 4))


def test_min_channels_is_honoured():
    scores = {"fc1": 100 + torch.arange(16.0), "fc2": torch.arange(16.0)}
    model = mlp()
    assert prune(model, scores, 0.5, mlp_groups(16), min_channels=4).kept == {"fc1": 12, "fc2": 4}
    assert torch.equal(model.fc2.out_mask, mask(range(12, 16), 16))  # its best four
    model = mlp()
    report = prune(model, scores, 0.1, mlp_groups(16), ranking="layer", min_channels=5)
    assert report.kept == {"fc1": 5, "fc2": 5}
    model = mlp()  # zero allowed: a whole group may go
    assert prune(model, scores, 0.25, mlp_groups(16), min_channels=0).kept == {"fc1": 8, "fc2": 0}
    assert not model.fc2.out_mask.any() and not model.head.in_mask.any()


@pytest.mark.parametrize(("density", "round_to", "min_channels", "expected"), [
    (0.25, 8, 1, 8),     # 10 channels -> nearest multiple of 8
    (0.35, 8, 1, 16),    # 14 -> 16
    (0.3, 8, 1, 16),     # 12 -> 16: half way rounds up
    (0.9, 16, 1, 32),    # 36 -> 32
    (0.99, 16, 1, 40),   # 39.6 -> 40 -> 48, capped at the group size 40
    (0.05, 8, 1, 8),     # 2 -> 0, raised to the smallest multiple holding min_channels
    (0.05, 8, 9, 16),    # min_channels 9 -> 16
    (0.3, 1, 1, 12),     # no rounding
])
def test_round_to_rounds_kept_counts(density, round_to, min_channels, expected):
    model = mlp(hidden=40)
    scores = {"fc1": torch.rand(40), "fc2": torch.rand(40)}
    report = prune(model, scores, density, mlp_groups(40), ranking="layer", round_to=round_to,
                   min_channels=min_channels)
    assert report.kept == {"fc1": expected, "fc2": expected}
    assert int(model.fc1.out_mask.sum()) == expected == int(model.head.in_mask.sum())


def test_global_ranking_rounds_each_group():
    model = mlp(hidden=40)
    scores = {"fc1": 100 + torch.arange(40.0), "fc2": torch.arange(40.0)}
    # 40 of 80 kept: fc1 39, fc2 1 before rounding to 8 -> 40 and 8 (the minimum's multiple)
    assert prune(model, scores, 0.5, mlp_groups(40), round_to=8).kept == {"fc1": 40, "fc2": 8}


def test_masks_only_shrink():
    model = mlp()
    groups = mlp_groups(16)
    scores = {"fc1": torch.arange(16.0), "fc2": torch.arange(16.0)}
    prune(model, scores, 0.5, groups, ranking="layer")
    first = model.fc1.out_mask.clone()
    # reversed scores prefer the pruned channels, which must stay pruned
    reversed_scores = {name: value.flip(0) for name, value in scores.items()}
    prune(model, reversed_scores, 0.5, groups, ranking="layer")
    assert torch.equal(model.fc1.out_mask, first)
    report = prune(model, reversed_scores, 1.0, groups, ranking="layer")  # asking for more revives nothing
    assert torch.equal(model.fc1.out_mask, first) and report.density == 0.5
    prune(model, reversed_scores, 0.25, groups, ranking="layer")
    assert torch.equal(model.fc1.out_mask, mask(range(8, 12), 16))  # the best of the survivors
    assert torch.equal(model.fc2.in_mask, model.fc1.out_mask)


def test_residual_cnn_reaches_the_density_and_masks_agree_across_the_group():
    reference = convert(ResidualCNN(), rank=1)
    groups = channel_groups(reference, residual_cnn_input())
    total = sum(group.size for group in groups)
    generator = torch.Generator().manual_seed(0)
    for density in (0.9, 0.5, 0.3, 0.1):
        for ranking in ("global", "layer"):
            model = convert(ResidualCNN(), rank=1)
            scores = {name: torch.rand(layer.out_mask.numel(), generator=generator)
                      for name, layer in spa_layers(model).items()}
            report = prune(model, scores, density, groups, ranking=ranking)
            kept = sum(int(group.kept(model).sum()) for group in groups)
            assert kept == sum(report.kept.values())
            slack = 1 if ranking == "global" else len(groups) * 0.5  # the layer counts round each
            assert abs(kept - density * total) <= slack + 1e-9, (density, ranking)
            stream = model.stem.out_mask
            for layer in (model.block.conv2.out_mask, model.block.conv1.in_mask, model.down.conv1.in_mask,
                          model.down.shortcut[0].in_mask):
                assert torch.equal(layer, stream)
            assert torch.equal(model.down.conv2.out_mask, model.down.shortcut[0].out_mask)
            assert torch.equal(model.head.in_mask, model.down.conv2.out_mask)
            assert model.head.out_mask.all()


# --------------------------------------------------------------------------------------------------
# Rounds


def test_round_densities_are_geometric():
    assert round_densities(0.125, 3) == pytest.approx([0.5, 0.25, 0.125])
    assert round_densities(0.3, 1) == [0.3]
    assert round_densities(1.0, 2) == [1.0, 1.0]


def test_iterative_prune_rounds_fine_tune_and_shrinking_masks():
    model = mlp(hidden=40)
    criterion = FixedCriterion({"fc1": torch.rand(40), "fc2": torch.rand(40), "head": torch.rand(5)})
    fed, seen = [], []

    def feed(m: nn.Module) -> None:
        fed.append(m)

    def fine_tune(m: nn.Module, step: int) -> None:
        seen.append((step, m.fc1.out_mask.clone(), int(m.fc1.out_mask.sum()) + int(m.fc2.out_mask.sum())))

    reports = iterative_prune(model, criterion, feed, 0.125, 3, fine_tune=fine_tune, groups=mlp_groups(40),
                              ranking="layer", progress=False)
    assert criterion.calls == 3 and fed == [model] * 3
    assert [step for step, _, _ in seen] == [0, 1, 2]
    assert [kept for _, _, kept in seen] == [40, 20, 10]  # fine-tuned after each round's pruning
    assert [r.target for r in reports] == pytest.approx([0.5, 0.25, 0.125])
    assert [r.density for r in reports] == [0.5, 0.25, 0.125]
    assert all(isinstance(r, PruneReport) for r in reports)
    masks = [m for _, m, _ in seen]
    for earlier, later in zip(masks, masks[1:], strict=False):
        assert not (later & ~earlier).any()  # nothing revived


def test_iterative_prune_finds_groups_from_example_inputs_and_shows_progress(capsys):
    model = convert(ResidualCNN(), rank=1)
    scores = {name: torch.rand(layer.out_mask.numel()) for name, layer in spa_layers(model).items()}
    reports = iterative_prune(model, FixedCriterion(scores), lambda m: None, 0.5, 2,
                              example_inputs=residual_cnn_input(), round_to=2, progress=True)
    assert len(reports) == 2
    assert reports[-1].sizes == {"stem": 8, "block.conv1": 8, "down.conv1": 16, "down.conv2": 16}
    assert abs(reports[-1].density - 0.5) <= 2 * len(reports[-1].sizes) / 48
    assert all(count % 2 == 0 for count in reports[-1].kept.values())
    assert reports[0].density > reports[1].density
    assert "pruning" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"density": 0.0}, ValueError, "density"),
    ({"density": 1.5}, ValueError, "density"),
    ({"density": math.nan}, ValueError, "density"),
    ({"density": "0.5"}, TypeError, "density"),
    ({"density": True}, TypeError, "density"),
    ({"ranking": "random"}, ValueError, "ranking"),
    ({"min_channels": -1}, ValueError, "min_channels"),
    ({"min_channels": 1.0}, TypeError, "min_channels"),
    ({"round_to": 0}, ValueError, "round_to"),
    ({"round_to": 8.0}, TypeError, "round_to"),
    ({"scores": {"fc1": torch.rand(16)}}, ValueError, "fc2"),
    ({"scores": [torch.rand(16)]}, TypeError, "scores"),
    ({"groups": []}, ValueError, "groups"),
    ({"groups": ["fc1"]}, TypeError, "groups"),
])
def test_prune_rejects_bad_arguments(kwargs, error, match):
    model = mlp()
    arguments = {"scores": {"fc1": torch.rand(16), "fc2": torch.rand(16)}, "density": 0.5,
                 "groups": mlp_groups(16), **kwargs}
    with pytest.raises(error, match=match):
        prune(model, arguments.pop("scores"), arguments.pop("density"), arguments.pop("groups"), **arguments)
    assert model.fc1.out_mask.all() and model.fc2.out_mask.all()  # nothing changed


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"steps": 0}, ValueError, "steps"),
    ({"steps": 2.0}, TypeError, "steps"),
    ({"density": 0}, ValueError, "density"),
    ({"criterion": object()}, TypeError, "criterion"),
    ({"feed": None}, TypeError, "feed"),
    ({"fine_tune": 3}, TypeError, "fine_tune"),
    ({"groups": None}, ValueError, "example_inputs"),
    ({"ranking": "l1"}, ValueError, "ranking"),
    ({"round_to": 0}, ValueError, "round_to"),
])
def test_iterative_prune_rejects_bad_arguments(kwargs, error, match):
    model = mlp()
    criterion = FixedCriterion({"fc1": torch.rand(16), "fc2": torch.rand(16)})
    arguments = {"criterion": criterion, "feed": lambda m: None, "density": 0.5, "steps": 2,
                 "groups": mlp_groups(16), "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        iterative_prune(model, arguments.pop("criterion"), arguments.pop("feed"), arguments.pop("density"),
                        arguments.pop("steps"), **arguments)
    assert criterion.calls == 0
