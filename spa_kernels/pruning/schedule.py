"""Pruning schedules: from channel scores to masks, at once or over several rounds.

*Density* is the fraction of prunable channels kept: the kept channels of all
coupled groups over the sum of their sizes (a channel of a group counts once,
however many layers share it).  Channels outside every group (image channels,
classes) are not prunable and do not count.

:func:`prune` prunes once.  Per group the producers' scores are combined into one
score per group channel (:meth:`ChannelGroup.score`), and the highest-scoring
channels are kept:

* ``ranking="global"``: one threshold across all groups on the raw group
  scores, so groups with weak channels lose more of them.  Making scores of
  different layers comparable (normalising them per layer) is the criterion's
  job, not the schedule's.
* ``ranking="layer"``: every group keeps ``density`` of its own channels.

Then per group: at least ``min_channels``; the count rounded to the nearest
multiple of ``round_to`` (kernels run faster on multiples of 8, 16 or 32), raised
to the smallest multiple that is at least ``min_channels``, and capped at the
group size (a whole group is the fastest shape of all).  Masks only shrink: a
channel already pruned is never revived, which caps a group at the channels it
still has.  Rounding moves the reached density by at most ``round_to / 2``
channels per group; ``round_to=1`` reaches the target up to the rounding of one
channel (unless ``min_channels`` or earlier pruning forbid it).

:func:`iterative_prune` prunes in ``steps`` rounds, scoring before each and
optionally fine-tuning after each; the round densities fall geometrically from
1 to ``density`` (:func:`round_densities`), so every round removes the same
fraction of the channels still kept, gentle on a network that has already lost
many.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor, nn

from .groups import ChannelGroup, channel_groups

RANKINGS = ("global", "layer")


@dataclass
class PruneReport:
    """What one pruning step kept: per group (keyed by its first producer), kept channels and size."""

    target: float
    kept: dict[str, int]
    sizes: dict[str, int]

    @property
    def density(self) -> float:
        """The reached density: kept prunable channels over prunable channels."""
        total = sum(self.sizes.values())
        return sum(self.kept.values()) / total if total else 1.0

    def __str__(self) -> str:
        rows = "\n".join(f"  {name}: {self.kept[name]}/{size}" for name, size in self.sizes.items())
        return f"density {self.density:.4f} (target {self.target:.4f})\n{rows}"


def prune(
    model: nn.Module,
    scores: Mapping[str, Tensor],
    density: float,
    groups: Iterable[ChannelGroup],
    *,
    ranking: str = "global",
    min_channels: int = 1,
    round_to: int = 1,
) -> PruneReport:
    """Prune ``model``'s coupled channel groups once, keeping ``density`` of their channels.

    Args:
        model: the model holding the groups' SPA layers; its masks are changed.
        scores: per SPA layer, one score per output channel (higher = more important);
            every producer of every group needs an entry.
        density: fraction of prunable channels to keep, in ``(0, 1]``.
        groups: the coupled groups (:func:`channel_groups`).
        ranking: ``"global"`` (one threshold over all groups) or ``"layer"``
            (every group keeps ``density`` of its channels).
        min_channels: channels every group keeps at least (if it still has them).
        round_to: kept counts are rounded to multiples of this (see the module doc).

    Returns:
        A :class:`PruneReport` of the kept channels per group.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range, ``groups`` is empty, or a producer
            has no (or a malformed) score.
    """
    _check_density(density)
    _check_options(ranking, min_channels, round_to)
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a mapping of layer name to tensor, got {type(scores).__name__}")
    groups = _check_groups(groups)
    group_scores = [group.score(scores) for group in groups]  # raises for a missing producer
    alive = [group.kept(model) for group in groups]
    sizes = [group.size for group in groups]
    if ranking == "layer":
        wanted = [_round_half_up(density * size) for size in sizes]
    else:
        wanted = _global_counts(group_scores, alive, _round_half_up(density * sum(sizes)), min_channels)
    report = PruneReport(float(density), {}, {})
    for group, score, still, count in zip(groups, group_scores, alive, wanted, strict=True):
        count = min(_rounded_count(count, group.size, min_channels, round_to), int(still.sum()))
        keep = _top(score, still, count)
        group.apply(model, keep)
        label = group.producers[0]
        report.kept[label], report.sizes[label] = int(keep.sum()), group.size
    return report


def iterative_prune(
    model: nn.Module,
    criterion,
    feed: Callable[[nn.Module], object],
    density: float,
    steps: int,
    *,
    fine_tune: Callable[[nn.Module, int], object] | None = None,
    groups: Iterable[ChannelGroup] | None = None,
    example_inputs=None,
    ranking: str = "global",
    min_channels: int = 1,
    round_to: int = 1,
    progress: bool = True,
) -> list[PruneReport]:
    """Prune ``model`` to ``density`` in ``steps`` rounds of scoring, pruning and fine-tuning.

    Round ``step`` (0, 1, …, ``steps - 1``): ``scores = criterion.collect(model, feed)``;
    :func:`prune` to the round's density (:func:`round_densities`); then
    ``fine_tune(model, step)`` if given.

    Args:
        model: the model to prune; its masks are changed.
        criterion: anything with ``collect(model, feed) -> dict[str, Tensor]``
            (the criteria of :mod:`spa_kernels.pruning.criteria`).
        feed: runs the scoring batches on the model (handed to ``collect``).
        density: the final fraction of prunable channels kept, in ``(0, 1]``.
        steps: rounds, at least 1.
        fine_tune: called after each round's pruning with the model and the round.
        groups: the coupled groups; found with :func:`channel_groups` on
            ``example_inputs`` when not given.
        example_inputs: one forward's inputs, needed only without ``groups``.
        ranking, min_channels, round_to: as :func:`prune`.
        progress: show a progress display while running.

    Returns:
        One :class:`PruneReport` per round.

    Raises:
        TypeError: an argument has the wrong type (``criterion`` without
            ``collect``, ``feed`` or ``fine_tune`` not callable …).
        ValueError: an argument is out of range, or neither ``groups`` nor
            ``example_inputs`` is given.
    """
    densities = round_densities(density, steps)
    _check_options(ranking, min_channels, round_to)
    if not callable(getattr(criterion, "collect", None)):
        raise TypeError(f"criterion must have a collect(model, feed) method, got {type(criterion).__name__}")
    if not callable(feed):
        raise TypeError(f"feed must be callable, got {type(feed).__name__}")
    if fine_tune is not None and not callable(fine_tune):
        raise TypeError(f"fine_tune must be callable or None, got {type(fine_tune).__name__}")
    if groups is None:
        if example_inputs is None:
            raise ValueError("iterative_prune needs groups or example_inputs to find them")
        groups = channel_groups(model, example_inputs)
    groups = _check_groups(groups)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    reports: list[PruneReport] = []
    columns = (TextColumn("[bold]pruning"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, disable=not progress) as display:
        task = display.add_task(f"target {density:.3f}", total=steps)
        for step, target in enumerate(densities):
            display.update(task, description=f"round {step + 1}: scoring")
            scores = criterion.collect(model, feed)
            display.update(task, description=f"round {step + 1}: pruning to {target:.3f}")
            report = prune(model, scores, target, groups, ranking=ranking, min_channels=min_channels,
                           round_to=round_to)
            reports.append(report)
            if fine_tune is not None:
                display.update(task, description=f"round {step + 1}: fine-tuning at {report.density:.3f}")
                fine_tune(model, step)
            display.update(task, advance=1, description=f"density {report.density:.3f}")
    return reports


def round_densities(density: float, steps: int) -> list[float]:
    """The target density of each round: ``density ** ((step + 1) / steps)``, ending at ``density``."""
    _check_density(density)
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return [density ** ((step + 1) / steps) for step in range(steps - 1)] + [float(density)]


# --------------------------------------------------------------------------------------------------


def _global_counts(scores: list[Tensor], alive: list[Tensor], budget: int, min_channels: int) -> list[int]:
    """Kept channels per group: each group's best ``min_channels``, then the best of the rest overall."""
    reserved = [min(min_channels, int(still.sum())) for still in alive]
    remaining = max(budget - sum(reserved), 0)
    candidates, owners = [], []
    for index, (score, still, count) in enumerate(zip(scores, alive, reserved, strict=True)):
        order = _ranked(score, still)[count:int(still.sum())]  # alive channels not reserved, best first
        candidates.append(score[order])
        owners.append(torch.full((order.numel(),), index, dtype=torch.int64))
    taken = torch.cat(owners)[_descending(torch.cat(candidates))[:remaining]]
    extra = torch.bincount(taken, minlength=len(scores)).tolist()
    return [count + more for count, more in zip(reserved, extra, strict=True)]


def _rounded_count(count: int, size: int, min_channels: int, round_to: int) -> int:
    """``count`` to the nearest multiple of ``round_to``, at least ``min_channels``, at most ``size``."""
    count = _round_half_up(count / round_to) * round_to
    if count < min_channels:
        count = math.ceil(min_channels / round_to) * round_to
    return min(count, size)


def _top(score: Tensor, alive: Tensor, count: int) -> Tensor:
    """Bool mask of the ``count`` best alive channels."""
    keep = torch.zeros(score.numel(), dtype=torch.bool)
    keep[_ranked(score, alive)[:count]] = True
    return keep


def _ranked(score: Tensor, alive: Tensor) -> Tensor:
    """Channel indices, alive ones first, each part by descending score (ties: lower index first)."""
    by_score = _descending(score)
    return by_score[torch.argsort(~alive[by_score], stable=True)]


def _descending(values: Tensor) -> Tensor:
    return torch.sort(values, descending=True, stable=True).indices


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def _check_density(density) -> None:
    if isinstance(density, bool) or not isinstance(density, Real):
        raise TypeError(f"density must be a real number, got {type(density).__name__}")
    if not 0 < density <= 1:  # also rejects NaN
        raise ValueError(f"density must be in (0, 1], got {density}")


def _check_options(ranking, min_channels, round_to) -> None:
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
    for name, value, least in (("min_channels", min_channels, 0), ("round_to", round_to, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")


def _check_groups(groups) -> list[ChannelGroup]:
    if isinstance(groups, ChannelGroup):
        raise TypeError("groups must be a list of ChannelGroup, got a single ChannelGroup")
    groups = list(groups)
    for group in groups:
        if not isinstance(group, ChannelGroup):
            raise TypeError(f"groups must hold ChannelGroup objects, got {type(group).__name__}")
    if not groups:
        raise ValueError("groups is empty: the model has no prunable channel group")
    return groups


__all__ = ["PruneReport", "iterative_prune", "prune", "round_densities"]
