"""Adaptive activation-based pruning: a threshold search over prune → retrain rounds.

After Zhao, Jain and Zhao, *Adaptive Activation-based Structured Pruning* (arXiv
2201.10520).  Channels are scored by their activation attention map (the mean over
samples and positions of ``|a_c|^p``, :class:`~spa_kernels.pruning.criteria.ActivationCriterion`),
and one global threshold ``T`` is split over the layers in proportion to their size:

    T_l = T · P_l / Σ_j P_j

with ``P_l`` the layer's active parameter count (``weighting="parameters"``) or its
active multiply-accumulates (``weighting="flops"``).  A channel of layer
``l`` is pruned when its score falls below ``T_l``.  Rounds of prune-at-``T`` then
retrain repeat while a search moves ``T``: up by ``step`` after a good round, back to
the last accepted model with half the step after a bad one.  Three policies say what
"good" means (see :class:`AdaptivePolicy`).

Choices made here, each where the paper leaves room:

* **Scores are normalised per layer** before the comparison: by default each layer's
  scores are divided by the largest score among its still-active channels
  (``normalise="max"``).  Raw attention values differ in scale from layer to layer
  (batch norm, depth, the power ``p``), so without this one ``T`` would mean different
  things in different layers and different models; after it, ``T_l = 0.4`` prunes the
  channels that carry less than 40% of the layer's strongest channel's attention.  The
  maximum is used rather than the mean because pruning the weak channels does not
  move it: applying the same ``T`` again prunes nothing new unless retraining changed
  the scores (or ``P_l`` moved), whereas the mean of the survivors rises after every
  round and keeps pulling more channels under the threshold.  ``normalise="mean"``
  (mean over the active channels) is available, and ``normalise="none"`` compares raw
  scores, as the authors' released code does.
* **Where the attention is measured is the caller's choice**: any scores dict works.
  The paper takes the map after the layer's batch norm and ReLU;
  :class:`~spa_kernels.pruning.criteria.ActivationCriterion` takes it at the SPA
  layer's own output, before any batch norm, which rescales every channel to unit
  variance (the digits example, ``examples/adaptive_pruning.py``, measures both).
* **P_l is recomputed every round from the current masks** (the authors' code counts
  the non-zero weights each round), so a layer that has been pruned gets a smaller
  share of ``T``.  Parameters are the base weights the pruned layer computes with,
  ``|O|·|S|·k`` (``k`` kernel taps, 1 for a linear layer); FLOPs are that times the
  layer's output positions in one forward of ``example_inputs`` (multiply-accumulates
  of the base weights; the factor 2 and the batch size cancel in ``P_l / Σ P``).
* **Coupled channels are pruned as a group.**  Channels tied by a residual addition
  (:func:`~spa_kernels.pruning.groups.channel_groups`) must go together, so the unit of
  the paper's "layer" is a channel group: its score is the group's combined score
  (``ChannelGroup.score``), normalised as above, and its ``P`` is the sum of its
  producer layers' ``P_l``.  A group with one producer is exactly the paper's layer.
* **Pruning only removes.**  A channel pruned in an earlier round stays pruned, and
  every group keeps at least ``min_channels`` channels (its best-scoring active ones)
  so no layer is cut through.
* **The score is compared with ``<``**: a channel whose normalised score equals
  ``T_l`` is kept (``T = 0`` prunes nothing).

The search (:class:`ThresholdSearch`) is a small pure state machine; the model work
(prune at ``T``, retrain, evaluate, measure) is handed to :func:`adaptive_prune` as
callables, so a policy can be checked on scripted accuracies without any model.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .thresholds import check_number

logger = logging.getLogger(__name__)

POLICIES = ("accuracy", "memory", "latency")
LATENCY_METRICS = ("flops", "latency")
# Comparisons of accuracy drops and reductions allow this much floating-point slack, so
# that a drop of exactly the budget (1.1 - 1.0 against 0.1, say) counts as within it.
_SLACK = 1e-9


# --------------------------------------------------------------------------- policies


@dataclass(frozen=True)
class Measurement:
    """What a model costs: parameters, FLOPs (or MACs) and, optionally, a measured latency."""

    parameters: float
    flops: float
    latency: float | None = None


@dataclass(frozen=True)
class Outcome:
    """What one round produced: accuracy (any unit, higher is better) and costs."""

    accuracy: float
    parameters: float
    flops: float
    latency: float | None = None

    @classmethod
    def of(cls, accuracy: float, measurement: Measurement) -> Outcome:
        return cls(accuracy, measurement.parameters, measurement.flops, measurement.latency)


@dataclass(frozen=True)
class AdaptivePolicy:
    """What the threshold search aims for, and how it moves ``T``.

    Policies (build them with the class methods):

    * ``"accuracy"`` (accuracy-critical): the largest reduction whose accuracy drop
      from the unpruned model stays within ``budget``.  A round is accepted when
      ``baseline.accuracy - accuracy <= budget``; the search ends when the step falls
      below ``min_step`` or after ``max_rounds``.
    * ``"memory"`` (memory-constrained): reach a parameter reduction of ``target``
      (a fraction, ``1 - parameters / baseline.parameters``).
    * ``"latency"`` (latency-sensitive): reach a reduction of ``target`` in FLOPs
      (``metric="flops"``) or in measured latency (``metric="latency"``).

    For the two constrained policies a round fails (roll back, halve the step) when
    the accuracy drop exceeds ``budget`` (if one is given) or the reduction overshoots
    ``target + tolerance`` (if a tolerance is given: the search then closes in on the
    target from below instead of jumping past it); otherwise it is accepted, and the
    search ends as soon as an accepted round reaches ``target``.

    ``T`` starts at ``initial_threshold`` (``step`` if None); after an accepted round
    it rises by ``step``; after a failed one the model returns to the last accepted
    state, ``step`` halves and ``T`` becomes the last accepted ``T`` plus the new step
    (the unpruned model counts as accepted at ``T = 0``).  The search also ends when a
    halved step is below ``min_step`` and after ``max_rounds`` rounds.

    Accuracy drops and reductions are compared with a slack of 1e-9, so that a drop of
    exactly the budget counts as within it despite floating-point rounding.
    """

    policy: str
    step: float
    min_step: float
    max_rounds: int
    budget: float | None = None
    target: float | None = None
    tolerance: float | None = None
    metric: str = "parameters"
    initial_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        check_number(self.step, "step", minimum=0.0, strict=True)
        check_number(self.min_step, "min_step", minimum=0.0, strict=True)
        if isinstance(self.max_rounds, bool) or not isinstance(self.max_rounds, int):
            raise TypeError(f"max_rounds must be an int, got {type(self.max_rounds).__name__}")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")
        if self.initial_threshold is not None:
            check_number(self.initial_threshold, "initial_threshold", minimum=0.0)
        if self.budget is not None:
            check_number(self.budget, "budget", minimum=0.0)
        if self.tolerance is not None:
            check_number(self.tolerance, "tolerance", minimum=0.0)
        if self.policy == "accuracy":
            if self.budget is None:
                raise ValueError('the "accuracy" policy needs an accuracy-drop budget')
            if self.target is not None or self.tolerance is not None:
                raise ValueError('the "accuracy" policy takes no target or tolerance')
            if self.metric != "parameters":
                raise ValueError('the "accuracy" policy takes no metric')
            return
        if self.target is None:
            raise ValueError(f'the "{self.policy}" policy needs a reduction target')
        target = check_number(self.target, "target")
        if not 0.0 < target < 1.0:
            raise ValueError(f"target must be a fraction in (0, 1), got {target}")
        allowed = ("parameters",) if self.policy == "memory" else LATENCY_METRICS
        if self.metric not in allowed:
            raise ValueError(f'metric of the "{self.policy}" policy must be one of {allowed}, got {self.metric!r}')

    @classmethod
    def accuracy_critical(
        cls, budget: float, *, step: float = 0.1, min_step: float = 0.01, max_rounds: int = 20,
        initial_threshold: float | None = None,
    ) -> AdaptivePolicy:
        """Largest reduction within an accuracy drop of ``budget`` (in the accuracy's unit)."""
        return cls("accuracy", step, min_step, max_rounds, budget=budget, initial_threshold=initial_threshold)

    @classmethod
    def memory_constrained(
        cls, target: float, *, budget: float | None = None, tolerance: float | None = None, step: float = 0.1,
        min_step: float = 0.01, max_rounds: int = 20, initial_threshold: float | None = None,
    ) -> AdaptivePolicy:
        """Reach a parameter reduction of ``target`` (fraction of the unpruned model's)."""
        return cls("memory", step, min_step, max_rounds, budget=budget, target=target, tolerance=tolerance,
                   initial_threshold=initial_threshold)

    @classmethod
    def latency_sensitive(
        cls, target: float, *, metric: str = "flops", budget: float | None = None, tolerance: float | None = None,
        step: float = 0.1, min_step: float = 0.01, max_rounds: int = 20, initial_threshold: float | None = None,
    ) -> AdaptivePolicy:
        """Reach a FLOP (``metric="flops"``) or measured-latency reduction of ``target``."""
        return cls("latency", step, min_step, max_rounds, budget=budget, target=target, tolerance=tolerance,
                   metric=metric, initial_threshold=initial_threshold)


@dataclass(frozen=True)
class Decision:
    """One round of the search: what was tried, what came of it, and what happens next.

    ``action`` is ``"accept"`` (the pruned, retrained model becomes the last accepted
    one) or ``"rollback"`` (the model returns to the last accepted one and the step
    halves: ``halved`` is then True).  ``stop`` ends the search; ``next_threshold`` is
    the ``T`` of the next round (None once stopped).
    """

    round: int
    threshold: float
    step: float
    outcome: Outcome
    action: str
    halved: bool
    stop: bool
    next_threshold: float | None
    next_step: float
    reason: str

    @property
    def label(self) -> str:
        """``"accept"``, ``"rollback+halve"``, with ``"+stop"`` when the search ends."""
        parts = [self.action] + (["halve"] if self.halved else []) + (["stop"] if self.stop else [])
        return "+".join(parts)


class ThresholdSearch:
    """The pure decision logic of the adaptive policies: outcomes in, decisions out.

    Args:
        policy: an :class:`AdaptivePolicy`.
        baseline: the :class:`Outcome` of the unpruned model; drops and reductions are
            measured against it.

    ``threshold`` is the ``T`` to try next; feed the outcome of that round to
    :meth:`decide`.  ``accepted_threshold`` is the ``T`` of the last accepted model
    (0 for the unpruned start).
    """

    def __init__(self, policy: AdaptivePolicy, baseline: Outcome):
        if not isinstance(policy, AdaptivePolicy):
            raise TypeError(f"policy must be an AdaptivePolicy, got {type(policy).__name__}")
        if not isinstance(baseline, Outcome):
            raise TypeError(f"baseline must be an Outcome, got {type(baseline).__name__}")
        _check_outcome(baseline, "baseline")
        denominator = getattr(baseline, policy.metric) if policy.policy != "accuracy" else baseline.parameters
        if denominator is None or denominator <= 0:
            raise ValueError(f"baseline.{policy.metric} must be > 0 for the {policy.policy!r} policy")
        self.policy = policy
        self.baseline = baseline
        self.step = float(policy.step)
        self.threshold = float(policy.step if policy.initial_threshold is None else policy.initial_threshold)
        self.accepted_threshold = 0.0
        self.accepted: Outcome = baseline
        self.rounds = 0
        self.done = False
        self.decisions: list[Decision] = []

    def reduction(self, outcome: Outcome, metric: str | None = None) -> float:
        """``1 - outcome.metric / baseline.metric`` (the policy's metric by default)."""
        metric = metric or self.policy.metric
        value = getattr(outcome, metric)
        if value is None:
            raise ValueError(f"outcome.{metric} is None but the policy measures {metric}")
        return 1.0 - value / getattr(self.baseline, metric)

    def _judge(self, outcome: Outcome) -> tuple[bool, bool, str]:
        """``(success, target_reached, reason)`` of one outcome under the policy."""
        policy = self.policy
        drop = self.baseline.accuracy - outcome.accuracy
        if policy.budget is not None and drop > policy.budget + _SLACK:
            return False, False, f"accuracy drop {drop:.3g} > budget {policy.budget:.3g}"
        if policy.policy == "accuracy":
            return True, False, f"accuracy drop {drop:.3g} <= budget {policy.budget:.3g}"
        reduction = self.reduction(outcome)
        assert policy.target is not None
        if policy.tolerance is not None and reduction > policy.target + policy.tolerance + _SLACK:
            return False, False, (
                f"{policy.metric} reduction {reduction:.3f} overshoots target {policy.target:.3f} "
                f"+ tolerance {policy.tolerance:.3f}"
            )
        if reduction >= policy.target - _SLACK:
            return True, True, f"{policy.metric} reduction {reduction:.3f} reaches target {policy.target:.3f}"
        return True, False, f"{policy.metric} reduction {reduction:.3f} below target {policy.target:.3f}"

    def decide(self, outcome: Outcome) -> Decision:
        """Judge the round just run at :attr:`threshold` and move the search on.

        Raises:
            RuntimeError: the search has already stopped.
            TypeError / ValueError: ``outcome`` is not a valid :class:`Outcome`.
        """
        if self.done:
            raise RuntimeError("the search has stopped; start a new ThresholdSearch")
        if not isinstance(outcome, Outcome):
            raise TypeError(f"outcome must be an Outcome, got {type(outcome).__name__}")
        _check_outcome(outcome, "outcome")
        self.rounds += 1
        tried, step = self.threshold, self.step
        success, reached, reason = self._judge(outcome)
        stop = False
        if success:
            action, halved = "accept", False
            self.accepted_threshold, self.accepted = tried, outcome
            if reached:
                stop = True
            next_threshold = tried + self.step
        else:
            action, halved = "rollback", True
            self.step = self.step / 2.0
            next_threshold = self.accepted_threshold + self.step
            if self.step < self.policy.min_step:
                stop = True
                reason += f"; step {self.step:.3g} < min_step {self.policy.min_step:.3g}"
        if not stop and self.rounds >= self.policy.max_rounds:
            stop = True
            reason += f"; round limit {self.policy.max_rounds}"
        self.done = stop
        self.threshold = next_threshold
        decision = Decision(
            round=self.rounds, threshold=tried, step=step, outcome=outcome, action=action, halved=halved,
            stop=stop, next_threshold=None if stop else next_threshold, next_step=self.step, reason=reason,
        )
        self.decisions.append(decision)
        return decision


def _check_outcome(outcome: Outcome, name: str) -> None:
    check_number(outcome.accuracy, f"{name}.accuracy")
    check_number(outcome.parameters, f"{name}.parameters", minimum=0.0)
    check_number(outcome.flops, f"{name}.flops", minimum=0.0)
    if outcome.latency is not None:
        check_number(outcome.latency, f"{name}.latency", minimum=0.0)


# --------------------------------------------------------------------------- the driver


@dataclass
class AdaptiveResult:
    """What :func:`adaptive_prune` ends with; the model holds the ``accepted`` state."""

    baseline: Outcome
    accepted: Outcome
    accepted_threshold: float
    records: list[Decision] = field(default_factory=list)


def _state_snapshot(model: nn.Module) -> dict[str, Tensor]:
    return copy.deepcopy(model.state_dict())


def _format_decision(decision: Decision, search: ThresholdSearch) -> str:
    o = decision.outcome
    latency = "" if o.latency is None else f" latency={o.latency:.4g}"
    return (
        f"round {decision.round}: T={decision.threshold:.4g} step={decision.step:.4g} "
        f"accuracy={o.accuracy:.3f} parameters={o.parameters:.0f} "
        f"({100 * search.reduction(o, 'parameters'):.1f}% fewer) flops={o.flops:.4g}{latency} "
        f"-> {decision.label} ({decision.reason})"
    )


def adaptive_prune(
    model: nn.Module,
    policy: AdaptivePolicy,
    *,
    prune_at: Callable[[nn.Module, float], Any],
    retrain: Callable[[nn.Module], Any],
    evaluate: Callable[[nn.Module], float],
    measure: Callable[[nn.Module], Measurement],
    on_round: Callable[[Decision], Any] | None = None,
) -> AdaptiveResult:
    """Iterative prune → retrain rounds under ``policy``; returns the round records.

    Each round calls ``prune_at(model, T)`` (prune the model in place at global
    threshold ``T``, e.g. with :func:`~spa_kernels.pruning.thresholds.prune_at_threshold`), ``retrain(model)``,
    ``evaluate(model) -> accuracy`` and ``measure(model) -> Measurement``, then lets a
    :class:`ThresholdSearch` decide.  An accepted model is snapshotted (a deep copy of
    its state dict: weights, adapters, biases, masks, batch-norm statistics, head); a
    rolled-back round loads the snapshot back, so the model is exactly the last
    accepted one.  ``prune_at`` and ``retrain`` must change the model only through its
    state (masks, values), not its structure, for the snapshot to restore it.

    The unpruned model is evaluated and measured first: it is the baseline and the
    first accepted state.  Every decision is logged (``logging`` at INFO, logger
    ``spa_kernels.pruning.adaptive``) and passed to ``on_round`` if given.  On return
    the model holds the last accepted state.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(policy, AdaptivePolicy):
        raise TypeError(f"policy must be an AdaptivePolicy, got {type(policy).__name__}")
    for name, fn in (("prune_at", prune_at), ("retrain", retrain), ("evaluate", evaluate), ("measure", measure)):
        if not callable(fn):
            raise TypeError(f"{name} must be callable")
    if on_round is not None and not callable(on_round):
        raise TypeError("on_round must be callable or None")

    def observe() -> Outcome:
        measurement = measure(model)
        if not isinstance(measurement, Measurement):
            raise TypeError(f"measure must return a Measurement, got {type(measurement).__name__}")
        return Outcome.of(float(evaluate(model)), measurement)

    baseline = observe()
    search = ThresholdSearch(policy, baseline)
    snapshot = _state_snapshot(model)
    logger.info(
        "adaptive pruning, %s policy: baseline accuracy=%.3f parameters=%.0f flops=%.4g",
        policy.policy, baseline.accuracy, baseline.parameters, baseline.flops,
    )
    while not search.done:
        prune_at(model, search.threshold)
        retrain(model)
        decision = search.decide(observe())
        if decision.action == "accept":
            snapshot = _state_snapshot(model)
        else:
            model.load_state_dict(snapshot)
        logger.info(_format_decision(decision, search))
        if on_round is not None:
            on_round(decision)
    return AdaptiveResult(baseline, search.accepted, search.accepted_threshold, list(search.decisions))


__all__ = [
    "AdaptivePolicy",
    "AdaptiveResult",
    "Decision",
    "Measurement",
    "Outcome",
    "ThresholdSearch",
    "adaptive_prune",
]
