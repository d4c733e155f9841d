"""Adaptive activation-based pruning: thresholds, the policies' decisions, rollback, bad input.

The policies are checked on scripted accuracy/cost sequences against decision lists
written out by hand; the thresholds against hand-computed ``T · P_l / Σ P``.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from support.pruning_models import ResidualCNN, TinyMLP, residual_cnn_input
from torch import nn

import spa_kernels
from spa_kernels.pruning._layers import spa_layers
from spa_kernels.pruning.adaptive import (
    AdaptivePolicy,
    Measurement,
    Outcome,
    ThresholdSearch,
    adaptive_prune,
)
from spa_kernels.pruning.groups import channel_groups
from spa_kernels.pruning.thresholds import (
    layer_thresholds,
    normalise_scores,
    prune_at_threshold,
    spa_layer_costs,
    threshold_keep,
)


def run_script(search: ThresholdSearch, outcomes: list[Outcome]) -> list[tuple[float, str, float | None]]:
    """Feed ``outcomes`` in order; (T tried, decision label, next T) per round until the search stops."""
    trace = []
    for outcome in outcomes:
        decision = search.decide(outcome)
        trace.append((decision.threshold, decision.label, decision.next_threshold))
        if decision.stop:
            break
    return trace


def assert_trace(trace, expected):
    assert [label for _, label, _ in trace] == [label for _, label, _ in expected]
    for (tried, _, after), (want_tried, _, want_after) in zip(trace, expected, strict=True):
        assert tried == pytest.approx(want_tried)
        assert (after is None) == (want_after is None)
        if want_after is not None:
            assert after == pytest.approx(want_after)


BASE = Outcome(accuracy=90.0, parameters=1000, flops=5000, latency=10.0)


def at(accuracy=90.0, parameters=1000, flops=5000, latency=10.0) -> Outcome:
    return Outcome(accuracy, parameters, flops, latency)


# --------------------------------------------------------------------------- thresholds


def test_layer_thresholds_by_hand():
    # Σ P = 1000: T_l = 2 · P_l / 1000
    got = layer_thresholds(2.0, {"a": 100, "b": 300, "c": 600})
    assert got == pytest.approx({"a": 0.2, "b": 0.6, "c": 1.2})
    assert layer_thresholds(0.0, {"a": 3, "b": 0}) == {"a": 0.0, "b": 0.0}
    assert layer_thresholds(1.5, {"only": 7}) == pytest.approx({"only": 1.5})


def test_normalise_scores_over_active_channels():
    scores = torch.tensor([0.0, 2.0, 4.0, 6.0])
    active = torch.tensor([False, True, True, True])
    # mean of the active scores is 4, max is 6
    assert torch.allclose(normalise_scores(scores, active, "mean"), torch.tensor([0, 0.5, 1.0, 1.5]).double())
    assert torch.allclose(normalise_scores(scores, active, "max"), torch.tensor([0, 1 / 3, 2 / 3, 1]).double())
    assert torch.equal(normalise_scores(scores, active, "none"), scores.double())
    zeros = torch.zeros(3)
    assert torch.equal(normalise_scores(zeros, torch.ones(3, dtype=torch.bool)), zeros.double())


def test_threshold_keep_rules():
    everyone = torch.ones(4, dtype=torch.bool)
    # plain comparison, a score equal to the threshold is kept
    keep = threshold_keep(torch.tensor([0.5, 0.2, 0.9, 0.3]), everyone, 0.5)
    assert keep.tolist() == [True, False, True, False]
    # nobody survives: the two best-scoring active channels are kept
    keep = threshold_keep(torch.tensor([0.5, 0.2, 0.9, 0.2]), everyone, 1.0, min_channels=2)
    assert keep.tolist() == [True, False, True, False]
    # ties go to the lower index
    keep = threshold_keep(torch.tensor([0.2, 0.2, 0.2]), torch.ones(3, dtype=torch.bool), 1.0, min_channels=2)
    assert keep.tolist() == [True, True, False]
    # an inactive channel is never revived, whatever its score
    active = torch.tensor([False, True, True, True])
    keep = threshold_keep(torch.tensor([5.0, 0.1, 0.2, 0.3]), active, 1.0)
    assert keep.tolist() == [False, False, False, True]
    keep = threshold_keep(torch.tensor([5.0, 0.1, 0.2, 0.3]), active, 0.15)
    assert keep.tolist() == [False, False, True, True]
    # min_channels=0 lets a layer go entirely
    assert not threshold_keep(torch.tensor([0.1, 0.2]), torch.ones(2, dtype=torch.bool), 1.0, 0).any()


def test_spa_layer_costs_by_hand():
    model = spa_kernels.convert(ResidualCNN(), rank=2)
    # |O|·|S|·k of each layer; the head is a SPLoRA linear layer (k = 1)
    params = {
        "stem": 8 * 3 * 9, "block.conv1": 8 * 8 * 9, "block.conv2": 8 * 8 * 9,
        "down.conv1": 16 * 8 * 9, "down.conv2": 16 * 16 * 9, "down.shortcut.0": 16 * 8, "head": 4 * 16,
    }
    assert spa_layer_costs(model) == params
    # 8×8 input: 64 positions before the stride-2 block, 16 after it, 1 for the head
    positions = {"stem": 64, "block.conv1": 64, "block.conv2": 64, "down.conv1": 16, "down.conv2": 16,
                 "down.shortcut.0": 16, "head": 1}
    flops = spa_layer_costs(model, "flops", residual_cnn_input(batch=3))
    assert flops == {name: 3 * params[name] * positions[name] for name in params}  # batch of 3
    # masks count: 5 of 8 stem outputs, and down.conv2 reads 10 of its 16 inputs
    layers = spa_layers(model)
    layers["stem"].set_masks(out_mask=torch.arange(8) < 5)
    layers["down.conv2"].set_masks(in_mask=torch.arange(16) < 10)
    costs = spa_layer_costs(model)
    assert costs["stem"] == 5 * 3 * 9
    assert costs["down.conv2"] == 16 * 10 * 9
    assert costs["block.conv1"] == 8 * 8 * 9


def test_spa_layer_costs_of_a_depthwise_convolution():
    model = nn.Sequential(spa_kernels.nn.SPLoRAConv2d(4, 4, 3, padding=1, groups=4, rank=1))
    assert spa_layer_costs(model) == {"0": 4 * 1 * 9}  # each output reads its own input only
    model[0].set_masks(in_mask=torch.tensor([True, False, True, True]), out_mask=torch.tensor([True, True, False, True]))
    # active (output, input) pairs per group: 1·1, 1·0, 0·1, 1·1
    assert spa_layer_costs(model) == {"0": 2 * 9}


class OneProducerGroup:
    """A channel group with one producer and one consumer (what the MLP's hidden layers are)."""

    def __init__(self, producer: str, consumer: str, size: int):
        self.producers, self.consumer, self.size = [producer], consumer, size

    def score(self, scores):
        return scores[self.producers[0]]

    def kept(self, model):
        return spa_layers(model)[self.producers[0]].out_mask.clone()

    def apply(self, model, keep):
        layers = spa_layers(model)
        layers[self.producers[0]].set_masks(out_mask=keep)
        layers[self.consumer].set_masks(in_mask=keep)


def test_prune_at_threshold_by_hand():
    model = spa_kernels.convert(TinyMLP(), rank=2)
    groups = [OneProducerGroup("fc1", "fc2", 16), OneProducerGroup("fc2", "head", 16)]
    # P: fc1 16·12 = 192, fc2 16·16 = 256; Σ = 448.  T = 1: T_fc1 = 0.4286, T_fc2 = 0.5714
    fc1 = torch.tensor([0.4] * 8 + [1.6] * 8)  # mean 1: the eight 0.4s fall below 0.4286
    fc2 = torch.tensor([0.5] * 4 + [0.6] * 4 + [1.45] * 8)  # mean 1: only the 0.5s fall below 0.5714
    kept = prune_at_threshold(model, groups, {"fc1": fc1, "fc2": fc2}, 1.0, normalise="mean")
    assert kept == {"fc1": 8, "fc2": 12}
    layers = spa_layers(model)
    assert layers["fc1"].out_mask.tolist() == [False] * 8 + [True] * 8
    assert layers["fc2"].in_mask.tolist() == [False] * 8 + [True] * 8
    assert layers["fc2"].out_mask.tolist() == [False] * 4 + [True] * 12
    assert layers["head"].in_mask.tolist() == [False] * 4 + [True] * 12

    # next round: P_fc1 = 8·12 = 96, P_fc2 = 12·8 = 96, so T_g = T/2 each.  The scores of
    # the pruned channels are 0 and do not count in the mean: fc1 active mean is 1.
    fc1 = torch.tensor([0.0] * 8 + [0.5, 0.5, 0.5, 0.5, 1.5, 1.5, 1.5, 1.5])
    fc2 = torch.tensor([0.0] * 4 + [1.0] * 12)
    kept = prune_at_threshold(model, groups, {"fc1": fc1, "fc2": fc2}, 1.2, normalise="mean")  # T_g = 0.6
    assert kept == {"fc1": 4, "fc2": 12}
    assert layers["fc1"].out_mask.tolist() == [False] * 12 + [True] * 4


def test_prune_at_threshold_normalises_by_the_maximum_by_default():
    model = spa_kernels.convert(TinyMLP(), rank=2)
    groups = [OneProducerGroup("fc1", "fc2", 16), OneProducerGroup("fc2", "head", 16)]
    layers = spa_layers(model)
    # P = 192, 256: T = 1 gives T_fc1 = 0.4286, T_fc2 = 0.5714.  fc1 normalised: c / 16 for
    # c = 1..16, so c = 1..6 go; fc2: 4 / 8 = 0.5 goes, 8 / 8 = 1 stays
    scores = {"fc1": torch.arange(1.0, 17.0), "fc2": torch.tensor([4.0] * 8 + [8.0] * 8)}
    assert prune_at_threshold(model, groups, scores, 1.0) == {"fc1": 10, "fc2": 8}
    assert layers["fc1"].out_mask.tolist() == [False] * 6 + [True] * 10
    # same T, same scores of the survivors: now P = 10·12 = 120 and 8·10 = 80, so
    # T_fc1 = 0.6 (c = 7, 8, 9 go: 9 / 16 < 0.6 <= 10 / 16) and T_fc2 = 0.4 (none go)
    scores = {"fc1": scores["fc1"] * layers["fc1"].out_mask, "fc2": scores["fc2"] * layers["fc2"].out_mask}
    assert prune_at_threshold(model, groups, scores, 1.0) == {"fc1": 7, "fc2": 8}
    assert layers["fc1"].out_mask.tolist() == [False] * 9 + [True] * 7
    assert layers["fc2"].out_mask.tolist() == [False] * 8 + [True] * 8


def test_prune_at_threshold_on_coupled_groups():
    model = spa_kernels.convert(ResidualCNN(), rank=2)
    groups = channel_groups(model, residual_cnn_input())
    assert [g.producers for g in groups] == [["stem", "block.conv2"], ["block.conv1"], ["down.conv1"],
                                             ["down.conv2", "down.shortcut.0"]]
    # P_g: 216 + 576 = 792, 576, 1152, 2304 + 128 = 2432; Σ = 4952.  T = 4952 / 792 gives
    # T_g = 1, 0.727, 1.455, 3.071
    residual = torch.tensor([0.5, 0.5, 1.5, 1.5, 1.0, 1.0, 1.0, 1.0])  # mean 1: the two 0.5s go
    scores = {
        "stem": residual, "block.conv2": residual, "block.conv1": torch.ones(8), "down.conv1": torch.ones(16),
        "down.conv2": torch.arange(16.0), "down.shortcut.0": torch.arange(16.0), "head": torch.ones(4),
    }
    kept = prune_at_threshold(model, groups, scores, 4952 / 792, normalise="mean")
    # block.conv1: 1 >= 0.727 keeps all; down.conv1: 1 < 1.455 everywhere, the first is kept;
    # down.conv2: at most 15 / 7.5 = 2 < 3.071, the best (channel 15) is kept
    assert kept == {"stem": 6, "block.conv1": 8, "down.conv1": 1, "down.conv2": 1}
    layers = spa_layers(model)
    residual_kept = [False, False] + [True] * 6
    for name, side in [("stem", "out_mask"), ("block.conv2", "out_mask"), ("block.conv1", "in_mask"),
                       ("down.conv1", "in_mask"), ("down.shortcut.0", "in_mask")]:
        assert getattr(layers[name], side).tolist() == residual_kept, name
    assert layers["down.conv1"].out_mask.tolist() == [True] + [False] * 15
    assert layers["down.conv2"].in_mask.tolist() == [True] + [False] * 15
    for name, side in [("down.conv2", "out_mask"), ("down.shortcut.0", "out_mask"), ("head", "in_mask")]:
        assert getattr(layers[name], side).tolist() == [False] * 15 + [True], name


def test_prune_at_threshold_weighting_by_flops_or_parameters():
    groups = [OneProducerGroup("block.conv1", "block.conv2", 8), OneProducerGroup("down.conv1", "down.conv2", 16)]
    scores = {"block.conv1": torch.tensor([0.7] * 4 + [1.3] * 4), "down.conv1": torch.tensor([0.7] * 8 + [1.3] * 8)}
    # parameters: block.conv1 8·8·9 = 576, down.conv1 16·8·9 = 1152 (1 : 2), so at T = 1.5
    # T_block = 0.5 and T_down = 1.0: only down.conv1's 0.7s go
    model = spa_kernels.convert(ResidualCNN(), rank=2)
    kept = prune_at_threshold(model, groups, scores, 1.5, weighting="parameters", normalise="mean")
    assert kept == {"block.conv1": 8, "down.conv1": 8}
    # FLOPs on 8×8 inputs: 576·64 = 36864 and 1152·16 = 18432 (2 : 1), so T_block = 1.0
    # and T_down = 0.5: only block.conv1's 0.7s go
    model = spa_kernels.convert(ResidualCNN(), rank=2)
    kept = prune_at_threshold(model, groups, scores, 1.5, weighting="flops", example_inputs=residual_cnn_input(),
                              normalise="mean")
    assert kept == {"block.conv1": 4, "down.conv1": 16}
    assert spa_layers(model)["block.conv2"].in_mask.tolist() == [False] * 4 + [True] * 4


# --------------------------------------------------------------------------- policies


def test_accuracy_policy_accepts_rolls_back_halves_and_stops():
    policy = AdaptivePolicy.accuracy_critical(1.0, step=0.1, min_step=0.03, max_rounds=20)
    search = ThresholdSearch(policy, BASE)
    trace = run_script(search, [at(89.5), at(89.0), at(88.0), at(89.2), at(88.5), at(99.0)])
    assert_trace(trace, [
        (0.1, "accept", 0.2),
        (0.2, "accept", 0.3),  # drop of exactly the budget is within it
        (0.3, "rollback+halve", 0.25),  # back to the model of T = 0.2, step 0.05
        (0.25, "accept", 0.30),
        (0.30, "rollback+halve+stop", None),  # step 0.025 < 0.03
    ])
    assert search.done
    assert search.accepted_threshold == pytest.approx(0.25)
    assert search.accepted.accuracy == 89.2
    with pytest.raises(RuntimeError, match="stopped"):
        search.decide(at(90.0))


def test_accuracy_policy_budget_in_floating_point():
    # 1.1 - 1.0 is 0.10000000000000009 in binary floating point: still within a budget of 0.1
    assert 1.1 - 1.0 > 0.1
    search = ThresholdSearch(AdaptivePolicy.accuracy_critical(0.1), Outcome(1.1, 10, 10))
    assert search.decide(Outcome(1.0, 5, 5)).action == "accept"


def test_accuracy_policy_round_limit_and_initial_threshold():
    policy = AdaptivePolicy.accuracy_critical(0.5, step=0.2, min_step=0.01, max_rounds=3, initial_threshold=1.0)
    trace = run_script(ThresholdSearch(policy, BASE), [at(90.0)] * 5)
    assert_trace(trace, [(1.0, "accept", 1.2), (1.2, "accept", 1.4), (1.4, "accept+stop", None)])


def test_failure_after_a_large_initial_threshold_restarts_from_the_unpruned_model():
    # the last accepted model is the unpruned one (T = 0): the retry is 0 + step / 2
    policy = AdaptivePolicy.accuracy_critical(1.0, step=0.2, min_step=0.01, max_rounds=3, initial_threshold=1.0)
    trace = run_script(ThresholdSearch(policy, BASE), [at(80.0), at(90.0), at(90.0)])
    assert_trace(trace, [(1.0, "rollback+halve", 0.1), (0.1, "accept", 0.2), (0.2, "accept+stop", None)])


def test_accuracy_policy_first_round_fails_back_to_unpruned():
    policy = AdaptivePolicy.accuracy_critical(1.0, step=0.4, min_step=0.1, max_rounds=10)
    search = ThresholdSearch(policy, BASE)
    trace = run_script(search, [at(80.0), at(80.0), at(89.5), at(85.0)])
    assert_trace(trace, [
        (0.4, "rollback+halve", 0.2),  # nothing accepted yet: back to T = 0 plus the halved step
        (0.2, "rollback+halve", 0.1),
        (0.1, "accept", 0.2),
        (0.2, "rollback+halve+stop", None),  # step 0.05 < 0.1
    ])
    assert search.accepted_threshold == pytest.approx(0.1)


def test_memory_policy_reaches_target():
    policy = AdaptivePolicy.memory_constrained(0.5, step=0.1, min_step=0.01, max_rounds=20)
    trace = run_script(ThresholdSearch(policy, BASE), [at(parameters=800), at(parameters=600), at(parameters=450)])
    assert_trace(trace, [(0.1, "accept", 0.2), (0.2, "accept", 0.3), (0.3, "accept+stop", None)])


def test_memory_policy_with_tolerance_and_budget():
    policy = AdaptivePolicy.memory_constrained(0.5, budget=2.0, tolerance=0.02, step=0.1, min_step=0.01, max_rounds=20)
    search = ThresholdSearch(policy, BASE)
    trace = run_script(search, [
        at(parameters=800),
        at(parameters=400),  # reduction 0.6 > 0.52: overshoot
        at(85.0, parameters=550),  # drop 5 > budget 2
        at(89.0, parameters=560),
        at(89.0, parameters=490),  # reduction 0.51: target reached within tolerance
    ])
    assert_trace(trace, [
        (0.1, "accept", 0.2),
        (0.2, "rollback+halve", 0.15),
        (0.15, "rollback+halve", 0.125),
        (0.125, "accept", 0.15),
        (0.15, "accept+stop", None),
    ])
    assert search.accepted.parameters == 490


def test_latency_policy_on_flops_and_on_measured_latency():
    flops = AdaptivePolicy.latency_sensitive(0.4, step=0.5, min_step=0.1, max_rounds=20)
    trace = run_script(ThresholdSearch(flops, BASE), [at(flops=4000, parameters=100), at(flops=3000)])
    # parameters fell 90% in round 1, but the policy watches FLOPs: 20% is short of 40%
    assert_trace(trace, [(0.5, "accept", 1.0), (1.0, "accept+stop", None)])

    latency = AdaptivePolicy.latency_sensitive(0.3, metric="latency", budget=1.0, step=0.5, min_step=0.2,
                                               max_rounds=20)
    trace = run_script(ThresholdSearch(latency, BASE), [
        at(latency=8.0, flops=100), at(88.0, latency=6.0), at(89.5, latency=7.5), at(88.0, latency=6.0),
    ])
    assert_trace(trace, [
        (0.5, "accept", 1.0),  # latency 20% lower, FLOPs irrelevant
        (1.0, "rollback+halve", 0.75),  # drop 2 > budget 1
        (0.75, "accept", 1.0),  # latency 25% lower, short of 30%
        (1.0, "rollback+halve+stop", None),  # step 0.125 < 0.2
    ])
    with pytest.raises(ValueError, match="latency"):
        ThresholdSearch(latency, BASE).decide(Outcome(90.0, 10, 10))


def test_decision_records_outcome_and_steps():
    search = ThresholdSearch(AdaptivePolicy.accuracy_critical(1.0, step=0.1, min_step=0.01), BASE)
    outcome = at(80.0, parameters=700)
    decision = search.decide(outcome)
    assert (decision.round, decision.step, decision.next_step, decision.outcome) == (1, 0.1, 0.05, outcome)
    assert decision.action == "rollback" and decision.halved and not decision.stop
    assert "budget" in decision.reason
    assert search.reduction(at(parameters=250), "parameters") == pytest.approx(0.75)


# --------------------------------------------------------------------------- the driver


def _perturb(model: nn.Module, seed: int) -> None:
    """Change every kind of state a round can change: masks, adapters, biases, BN statistics, head."""
    generator = torch.Generator().manual_seed(seed)
    layers = spa_layers(model)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.add_(1.0)
                module.running_var.mul_(2.0)
                module.num_batches_tracked.add_(5)
    keep = torch.rand(8, generator=generator) < 0.6
    keep[0] = True
    layers["block.conv1"].set_masks(out_mask=keep)
    layers["block.conv2"].set_masks(in_mask=keep)


def test_rollback_restores_the_accepted_model_exactly(caplog):
    torch.manual_seed(0)
    model = spa_kernels.convert(ResidualCNN(), rank=2)
    x = residual_cnn_input(batch=2)
    accuracies = iter([95.0, 50.0, 40.0])  # baseline, round 1 (accept), round 2 (fail)
    tried, accepted = [], {}

    def prune_at(m, threshold):
        tried.append(threshold)
        _perturb(m, seed=len(tried))

    def on_round(decision):
        if decision.action == "accept":
            accepted["state"] = copy.deepcopy(model.state_dict())
            model.eval()
            with torch.no_grad():
                accepted["output"] = model(x)

    policy = AdaptivePolicy.accuracy_critical(50.0, step=0.5, min_step=0.3, max_rounds=5)
    with caplog.at_level(logging.INFO, logger="spa_kernels.pruning.adaptive"):
        result = adaptive_prune(
            model, policy, prune_at=prune_at, retrain=lambda m: None, evaluate=lambda m: next(accuracies),
            measure=lambda m: Measurement(spa_layer_costs(m)["block.conv1"], 1.0), on_round=on_round,
        )
    assert tried == [0.5, 1.0]
    assert [r.label for r in result.records] == ["accept", "rollback+halve+stop"]
    assert result.accepted_threshold == 0.5 and result.accepted.accuracy == 50.0
    state = model.state_dict()
    assert state.keys() == accepted["state"].keys()
    for key, value in accepted["state"].items():
        assert torch.equal(state[key], value), key
    layers = spa_layers(model)
    for layer in layers.values():  # index lists follow the restored masks
        expected = None if layer.out_mask.all() else torch.nonzero(layer.out_mask).flatten()
        assert (layer.out_idx is None) == (expected is None)
        if expected is not None:
            assert torch.equal(layer.out_idx, expected)
    model.eval()
    assert torch.equal(model(x), accepted["output"])
    messages = [r.getMessage() for r in caplog.records]
    assert any("round 1" in m and "accept" in m for m in messages)
    assert any("round 2" in m and "rollback+halve+stop" in m for m in messages)


def test_rollback_with_real_groups_restores_masks_and_norm_zeros():
    torch.manual_seed(1)
    model = spa_kernels.convert(ResidualCNN(), rank=2)
    x = residual_cnn_input(batch=4)
    groups = channel_groups(model, x)
    layers = spa_layers(model)
    # round 1 (T = 1.5) gives the residual group T_g = 1.5 · 792 / 4952 = 0.24: channel 0 goes
    scores = {name: torch.ones(layer.out_mask.numel()) for name, layer in layers.items()}
    scores["stem"] = scores["block.conv2"] = torch.tensor([0.1, 0.3, 0.5, 1, 1, 1, 1, 1])
    accuracies = iter([90.0, 90.0, 0.0])
    seen = {}

    def on_round(decision):
        if decision.action == "accept":
            model.eval()
            with torch.no_grad():
                seen["output"] = model(x)
            seen["masks"] = {name: layer.out_mask.clone() for name, layer in layers.items()}

    result = adaptive_prune(
        model, AdaptivePolicy.accuracy_critical(1.0, step=1.5, min_step=1.0, max_rounds=5),
        prune_at=lambda m, t: prune_at_threshold(m, groups, scores, t),
        retrain=lambda m: None, evaluate=lambda m: next(accuracies),
        measure=lambda m: Measurement(sum(spa_layer_costs(m).values()), 1.0), on_round=on_round,
    )
    assert [r.label for r in result.records] == ["accept", "rollback+halve+stop"]
    pruned_more = result.records[1].outcome.parameters < result.records[0].outcome.parameters
    assert pruned_more  # round 2 did prune more, so the rollback had something to undo
    for name, layer in layers.items():
        assert torch.equal(layer.out_mask, seen["masks"][name]), name
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), seen["output"])
        # the batch norm after a pruned residual channel outputs exact zeros again
        stem_out = model.stem_bn(model.stem(x))
    pruned = ~layers["stem"].out_mask
    assert pruned.tolist() == [True] + [False] * 7
    assert (stem_out[:, 0] == 0).all() and (stem_out[:, 1:] != 0).any()


def test_driver_leaves_accepted_state_after_a_final_accept():
    model = spa_kernels.convert(TinyMLP(), rank=2)
    layers = spa_layers(model)

    def prune_at(m, threshold):
        keep = torch.arange(16) >= int(threshold)  # prune the first ⌊T⌋ channels of fc1
        layers["fc1"].set_masks(out_mask=keep)

    result = adaptive_prune(
        model, AdaptivePolicy.memory_constrained(0.25, step=2.0, min_step=0.5, max_rounds=10),
        prune_at=prune_at, retrain=lambda m: None, evaluate=lambda m: 1.0,
        measure=lambda m: Measurement(spa_layer_costs(m)["fc1"], 1.0),
    )
    # fc1 has 16·12 = 192 weights; T = 2, 4 prune 2 and 4 channels: 12.5%, then 25% = target
    assert [(r.threshold, r.label) for r in result.records] == [(2.0, "accept"), (4.0, "accept+stop")]
    assert int(layers["fc1"].out_mask.sum()) == 12
    assert result.baseline.parameters == 192 and result.accepted.parameters == 144


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"policy": "speed"}, ValueError, "policy"),
        ({"step": 0.0}, ValueError, "step"),
        ({"step": "big"}, TypeError, "step"),
        ({"min_step": -1.0}, ValueError, "min_step"),
        ({"max_rounds": 0}, ValueError, "max_rounds"),
        ({"max_rounds": 2.5}, TypeError, "max_rounds"),
        ({"max_rounds": True}, TypeError, "max_rounds"),
        ({"budget": -0.5}, ValueError, "budget"),
        ({"budget": None}, ValueError, "budget"),
        ({"budget": float("nan")}, ValueError, "budget"),
        ({"target": 0.5}, ValueError, "target"),
        ({"initial_threshold": -1.0}, ValueError, "initial_threshold"),
        ({"policy": "memory", "target": None, "budget": None}, ValueError, "target"),
        ({"policy": "memory", "target": 1.5, "budget": None}, ValueError, "target"),
        ({"policy": "memory", "target": 0.0, "budget": None}, ValueError, "target"),
        ({"policy": "memory", "target": 0.5, "metric": "flops"}, ValueError, "metric"),
        ({"policy": "latency", "target": 0.5, "metric": "energy"}, ValueError, "metric"),
        ({"policy": "latency", "target": 0.5, "tolerance": -0.1}, ValueError, "tolerance"),
    ],
)
def test_policy_rejects_bad_arguments(kwargs, error, match):
    arguments = {"policy": "accuracy", "step": 0.1, "min_step": 0.01, "max_rounds": 5, "budget": 1.0}
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        AdaptivePolicy(**arguments)


def test_search_and_helpers_reject_bad_arguments():
    accuracy = AdaptivePolicy.accuracy_critical(1.0)
    with pytest.raises(TypeError, match="policy"):
        ThresholdSearch("accuracy", BASE)
    with pytest.raises(TypeError, match="baseline"):
        ThresholdSearch(accuracy, {"accuracy": 1.0})
    with pytest.raises(ValueError, match="parameters"):
        ThresholdSearch(accuracy, Outcome(90.0, 0, 10))
    with pytest.raises(ValueError, match="latency"):
        ThresholdSearch(AdaptivePolicy.latency_sensitive(0.5, metric="latency"), Outcome(90.0, 10, 10))
    with pytest.raises(TypeError, match="outcome"):
        ThresholdSearch(accuracy, BASE).decide(90.0)
    with pytest.raises(ValueError, match="outcome.accuracy"):
        ThresholdSearch(accuracy, BASE).decide(Outcome(float("inf"), 10, 10))

    with pytest.raises(ValueError, match="threshold"):
        layer_thresholds(-1.0, {"a": 1})
    with pytest.raises(ValueError, match="costs"):
        layer_thresholds(1.0, {})
    with pytest.raises(ValueError, match="costs"):
        layer_thresholds(1.0, {"a": 0, "b": 0})
    with pytest.raises(ValueError, match="costs\\['b'\\]"):
        layer_thresholds(1.0, {"a": 1, "b": -2})
    with pytest.raises(TypeError, match="costs"):
        layer_thresholds(1.0, [1, 2])

    ones = torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="normalise"):
        normalise_scores(torch.ones(3), ones, "median")
    with pytest.raises(TypeError, match="active"):
        normalise_scores(torch.ones(3), torch.ones(3))
    with pytest.raises(TypeError, match="scores"):
        normalise_scores(torch.ones(3, dtype=torch.long), ones)
    with pytest.raises(ValueError, match="1-D"):
        normalise_scores(torch.ones(4), ones)
    with pytest.raises(ValueError, match=">= 0"):
        normalise_scores(torch.tensor([1.0, -1.0, 0.0]), ones)
    with pytest.raises(ValueError, match="min_channels"):
        threshold_keep(torch.ones(3), ones, 0.5, min_channels=-1)
    with pytest.raises(TypeError, match="min_channels"):
        threshold_keep(torch.ones(3), ones, 0.5, min_channels=1.0)

    model = spa_kernels.convert(TinyMLP(), rank=2)
    with pytest.raises(ValueError, match="weighting"):
        spa_layer_costs(model, "bytes")
    with pytest.raises(ValueError, match="example_inputs"):
        spa_layer_costs(model, "flops")
    with pytest.raises(ValueError, match="SPA layers"):
        spa_layer_costs(TinyMLP())
    with pytest.raises(TypeError, match="model"):
        spa_layer_costs("model")
    group = OneProducerGroup("fc1", "fc2", 16)
    scores = {"fc1": torch.ones(16)}
    with pytest.raises(ValueError, match="groups"):
        prune_at_threshold(model, [], scores, 1.0)
    with pytest.raises(ValueError, match="normalise"):
        prune_at_threshold(model, [group], scores, 1.0, normalise="z")
    with pytest.raises(ValueError, match="threshold"):
        prune_at_threshold(model, [group], scores, -0.1)
    with pytest.raises(ValueError, match="producers"):
        prune_at_threshold(model, [OneProducerGroup("nope", "fc2", 16)], scores, 1.0)

    with pytest.raises(TypeError, match="prune_at"):
        adaptive_prune(model, accuracy, prune_at=None, retrain=print, evaluate=print, measure=print)
    with pytest.raises(TypeError, match="policy"):
        adaptive_prune(model, "accuracy", prune_at=print, retrain=print, evaluate=print, measure=print)
    with pytest.raises(TypeError, match="Measurement"):
        adaptive_prune(model, accuracy, prune_at=print, retrain=print, evaluate=lambda m: 1.0,
                       measure=lambda m: (1, 2))
