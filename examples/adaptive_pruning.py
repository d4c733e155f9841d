"""Adaptive activation-based pruning of a SPLoRA-adapted network on digits.

    python -m examples.adaptive_pruning [--policy accuracy|memory|latency] [--budget 1.0]
                                        [--target 0.5] [--seed 0] [--out examples/out]

A residual CNN is pretrained on digits 0–4, then adapted to digits 5–9 with SPLoRA
(frozen base convolutions, rank-4 adapters; the batch norms and the head train too).
The adapted network is then pruned in prune → retrain rounds under one of the
adaptive policies of arXiv 2201.10520 (:mod:`spa_kernels.pruning.adaptive`): channels
are scored by their activation attention map, a global threshold ``T`` is split over
the channel groups in proportion to their parameters, and ``T`` rises after a good
round and falls back (with half the step) after a bad one.

The search decides on a validation split held out from the task's training images;
the test split is only reported, so the test accuracy of the final model is not
selected for.  "Parameters" are what the pruned network computes with: the active
blocks ``|O|·|S|·k`` of the base convolution weights.  Only the channels inside the
residual blocks can be pruned here: the residual stream feeds the plain linear head,
which holds no mask.

Run time: about 80 s with one thread, the default (the retraining rounds take most
of it).  The networks are tiny, so more threads gain little, and on a machine shared
with other jobs they can slow PyTorch down many times over (one run with two threads
on a busy two-core machine took 340 s).  The thread count changes the order of
floating-point sums and so the exact numbers, and with them the search's path: the
results of a seed are reproducible for one thread count on one machine.

Writes ``adaptive_<policy>.png`` (accuracy against parameters, round by round) and
``adaptive_<policy>.md`` (the rounds as a table) into ``--out``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from torch import nn

from examples._digits import (
    TASK_CLASSES,
    Split,
    accuracy,
    digits_split,
    pretrained_base,
    splora_task_model,
    train,
)
from spa_kernels.pruning.accounting import active_flops
from spa_kernels.pruning.adaptive import (
    AdaptivePolicy,
    AdaptiveResult,
    Decision,
    Measurement,
    adaptive_prune,
)
from spa_kernels.pruning.criteria import ActivationCriterion, Scores
from spa_kernels.pruning.groups import ChannelGroup, channel_groups
from spa_kernels.pruning.thresholds import prune_at_threshold, spa_layer_costs

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
LEARNING_RATE, SETTLE_RATE = 3e-3, 1e-3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", choices=("accuracy", "memory", "latency"), default="accuracy",
                        help="accuracy-critical, memory-constrained or latency-sensitive (default accuracy)")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="allowed validation-accuracy drop in points (default 1.0; for the memory and "
                             "latency policies a budget < 0 means none)")
    parser.add_argument("--target", type=float, default=0.5,
                        help="parameter (memory) or FLOP (latency) reduction to reach, a fraction (default 0.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default examples/out)")
    parser.add_argument("--step", type=float, default=1.0, help="initial step of the threshold T (default 1.0)")
    parser.add_argument("--min-step", type=float, default=0.1, help="stop once the step is below this (0.1)")
    parser.add_argument("--rounds", type=int, default=16, help="round limit (default 16)")
    parser.add_argument("--scores", choices=("post-relu", "spa-output"), default="post-relu",
                        help="where the attention maps are measured (default post-relu, as in the paper)")
    parser.add_argument("--retrain-epochs", type=int, default=9,
                        help="epochs of retraining per round, plus a third as many to settle (default 9)")
    parser.add_argument("--pretrain-epochs", type=int, default=15, help="epochs of pretraining on digits 0-4")
    parser.add_argument("--adapt-epochs", type=int, default=30,
                        help="epochs of SPLoRA adaptation to digits 5-9, plus a third as many to settle (default 30)")
    parser.add_argument("--normalise", choices=("max", "mean", "none"), default="max",
                        help="per-group score normalisation before the threshold (default max)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the networks are tiny, and more threads on a busy "
                             "machine slow PyTorch down many times over)")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.retrain_epochs < 0 or args.pretrain_epochs < 1 or args.adapt_epochs < 1:
        parser.error("--rounds, --pretrain-epochs and --adapt-epochs must be >= 1, --retrain-epochs >= 0")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def train_and_settle(model: nn.Module, split: Split, epochs: int, seed: int) -> None:
    """``epochs`` of Adam at 3e-3, then a third as many at 1e-3 (at least one) to settle.

    The settling epochs calm the epoch-to-epoch swing of the validation accuracy,
    which would otherwise be as large as the 1-point budget the search judges by.
    """
    if epochs > 0:
        train(model, split, epochs=epochs, lr=LEARNING_RATE, seed=seed)
        train(model, split, epochs=max(1, epochs // 3), lr=SETTLE_RATE, seed=seed + 1000)


def make_scorer(kind: str, groups: list[ChannelGroup], images: torch.Tensor) -> Callable[[nn.Module], Scores]:
    """Attention-map scores (``p = 2``) of every group's channels, measured on ``images``.

    ``"post-relu"``: at the ReLU after the group's batch norm, where the paper measures
    them (each prunable group here is one block's inner convolution, its batch norm and
    a ReLU).  ``"spa-output"``: at the SPA layers' own outputs, before the batch norm
    (:class:`~spa_kernels.pruning.criteria.ActivationCriterion`).  Batch norm rescales
    every channel to unit variance, so the size of a channel before it says little
    about its size after it.
    """

    def feed(model: nn.Module) -> None:
        model.eval()
        with torch.no_grad():
            model(images)

    if kind == "spa-output":
        criterion = ActivationCriterion(p=2.0)
        return lambda model: criterion.collect(model, feed)
    for group in groups:
        if len(group.producers) != 1 or len(group.norms) != 1:
            raise ValueError(f"post-ReLU scores need one producer and one norm per group, got {group!r}")

    def post_relu(model: nn.Module) -> Scores:
        scores: Scores = {}
        handles = []
        for group in groups:
            def hook(_module, _inputs, output, name=group.producers[0]):
                scores[name] = F.relu(output).double().pow(2).mean(dim=(0, 2, 3))

            handles.append(model.get_submodule(group.norms[0]).register_forward_hook(hook))
        try:
            feed(model)
        finally:
            for handle in handles:
                handle.remove()
        return scores

    return post_relu


def validation_split(task: Split, seed: int, fraction: float = 0.4) -> Split:
    """The task's training images split into training (``x_train``) and validation (``x_test``)."""
    order = torch.randperm(len(task.y_train), generator=torch.Generator().manual_seed(seed + 1))
    held = int(len(order) * fraction)
    val, fit = order[:held], order[held:]
    return Split(task.x_train[fit], task.y_train[fit], task.x_train[val], task.y_train[val])


def make_policy(args: argparse.Namespace) -> AdaptivePolicy:
    common = {"step": args.step, "min_step": args.min_step, "max_rounds": args.rounds}
    if args.policy == "accuracy":
        return AdaptivePolicy.accuracy_critical(args.budget, **common)
    budget = None if args.budget < 0 else args.budget
    if args.policy == "memory":
        return AdaptivePolicy.memory_constrained(args.target, budget=budget, **common)
    return AdaptivePolicy.latency_sensitive(args.target, metric="flops", budget=budget, **common)


@dataclass
class Run:
    """Everything one run measured, for the plot and the table."""

    policy: AdaptivePolicy
    result: AdaptiveResult
    test_accuracy: list[float] = field(default_factory=list)  # [0] = unpruned, then one per round
    accepted_test_accuracy: float = 0.0
    seconds: float = 0.0


def run(args: argparse.Namespace, console: Console | None = None) -> Run:
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    task = digits_split(TASK_CLASSES, seed=args.seed)
    fit = validation_split(task, args.seed)
    policy = make_policy(args)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[note]}"),
                  TimeElapsedColumn(), console=console, disable=args.quiet) as progress:
        phase = progress.add_task("pretraining on digits 0-4", total=None, note="")
        base = pretrained_base(seed=args.seed, epochs=args.pretrain_epochs)
        progress.update(phase, description="adapting to digits 5-9 with SPLoRA")
        model = splora_task_model(base, task.classes, rank=4, seed=args.seed)
        train_and_settle(model, fit, args.adapt_epochs, seed=args.seed)
        progress.update(phase, total=1, completed=1, description="pretrained and adapted")

        groups = channel_groups(model, fit.x_train[:2])
        score = make_scorer(args.scores, groups, fit.x_train)
        one_image = fit.x_train[:1]
        test_accuracy: list[float] = []
        rounds = progress.add_task("adaptive pruning", total=policy.max_rounds, note="")

        def prune_at(m: nn.Module, threshold: float) -> None:
            prune_at_threshold(m, groups, score(m), threshold, weighting="parameters", normalise=args.normalise)

        def retrain(m: nn.Module) -> None:
            train_and_settle(m, fit, args.retrain_epochs, seed=args.seed + len(test_accuracy))

        def evaluate(m: nn.Module) -> float:
            test_accuracy.append(accuracy(m, task))
            return accuracy(m, fit)

        def measure(m: nn.Module) -> Measurement:
            return Measurement(parameters=sum(spa_layer_costs(m).values()), flops=active_flops(m, one_image))

        def on_round(decision: Decision) -> None:
            o = decision.outcome
            progress.update(rounds, advance=1, note=(
                f"round {decision.round}: T={decision.threshold:.2f} val {o.accuracy:.1f}% "
                f"{o.parameters:,.0f} params -> {decision.label}"
            ))

        result = adaptive_prune(model, policy, prune_at=prune_at, retrain=retrain, evaluate=evaluate,
                                measure=measure, on_round=on_round)
        progress.update(rounds, total=len(result.records), completed=len(result.records))
    outcome = Run(policy, result, test_accuracy, accuracy(model, task), time.perf_counter() - started)
    return outcome


# --------------------------------------------------------------------------- reporting


def _reduction(value: float, base: float) -> float:
    return 100.0 * (1.0 - value / base)


def write_table(outcome: Run, args: argparse.Namespace, path: Path) -> None:
    result, base = outcome.result, outcome.result.baseline
    tests = outcome.test_accuracy
    final = result.accepted
    lines = [
        f"# Adaptive activation-based pruning on digits ({args.policy} policy)",
        "",
        f"Policy: `{outcome.policy}`. Attention maps (p = 2) measured at `{args.scores}`, normalised by the "
        f"group's `{args.normalise}`; layer thresholds weighted by parameters.",
        "",
        "Accuracies in percent; *val* is the validation split the search decides on, *test* the held-out test "
        "split. Parameters: active base-convolution weights `|O|·|S|·k`. FLOPs: one 8×8 image through the SPA "
        "layers (adapters included).",
        "",
        "| round | T | step | val acc | test acc | parameters | fewer | MFLOPs | decision | reason |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        f"| 0 (unpruned) | | | {base.accuracy:.2f} | {tests[0]:.2f} | {base.parameters:,.0f} | 0.0% | "
        f"{base.flops / 1e6:.3f} | | |",
    ]
    for record, test in zip(result.records, tests[1:], strict=True):
        o = record.outcome
        lines.append(
            f"| {record.round} | {record.threshold:.3f} | {record.step:.3f} | {o.accuracy:.2f} | {test:.2f} | "
            f"{o.parameters:,.0f} | {_reduction(o.parameters, base.parameters):.1f}% | {o.flops / 1e6:.3f} | "
            f"{record.label} | {record.reason} |"
        )
    test_drop = tests[0] - outcome.accepted_test_accuracy
    fewer = _reduction(final.parameters, base.parameters)
    met = "met" if fewer >= 50.0 and test_drop <= 1.0 else "not met"
    lines += [
        "",
        f"Final model (T = {result.accepted_threshold:.3f}): {final.parameters:,.0f} of {base.parameters:,.0f} "
        f"parameters ({fewer:.1f}% fewer), "
        f"{_reduction(final.flops, base.flops):.1f}% fewer FLOPs; validation accuracy "
        f"{base.accuracy:.2f} → {final.accuracy:.2f}, test accuracy {tests[0]:.2f} → "
        f"{outcome.accepted_test_accuracy:.2f} ({test_drop:+.2f} points lost).",
        "",
        f"Goal of at least 50% fewer parameters for at most 1 point of test accuracy: {met}.",
        "",
        f"Seed {args.seed}; {len(result.records)} rounds of {args.retrain_epochs} retraining epochs; "
        f"{outcome.seconds:.0f} s in all.",
        "",
    ]
    path.write_text("\n".join(lines))


def write_plot(outcome: Run, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result, base = outcome.result, outcome.result.baseline
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    accepted = [(base.parameters, base.accuracy, outcome.test_accuracy[0])]
    for record, test in zip(result.records, outcome.test_accuracy[1:], strict=True):
        o = record.outcome
        good = record.action == "accept"
        if good:
            accepted.append((o.parameters, o.accuracy, test))
        ax.scatter(o.parameters, o.accuracy, marker="o" if good else "x", s=46,
                   color="tab:green" if good else "tab:red", zorder=3)
        ax.annotate(str(record.round), (o.parameters, o.accuracy), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    xs, val, test = zip(*accepted, strict=True)
    ax.plot(xs, val, color="tab:green", lw=1, alpha=0.6, label="validation, accepted path")
    ax.plot(xs, test, color="tab:blue", lw=1, ls="--", marker=".", label="test, accepted models")
    ax.scatter([base.parameters], [base.accuracy], marker="*", s=120, color="black", zorder=4, label="unpruned")
    ax.scatter([], [], marker="o", color="tab:green", label="accepted round")
    ax.scatter([], [], marker="x", color="tab:red", label="rolled back")
    if outcome.policy.budget is not None:
        ax.axhline(base.accuracy - outcome.policy.budget, color="grey", ls=":", lw=1, label="accuracy budget (validation)")
    ax.invert_xaxis()
    ax.set_xlabel("parameters (active base-convolution weights)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Adaptive pruning on digits 5-9, {args.policy} policy")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Run:
    args = parse_args(argv)
    console = Console()
    outcome = run(args, console)
    args.out.mkdir(parents=True, exist_ok=True)
    table, plot = args.out / f"adaptive_{args.policy}.md", args.out / f"adaptive_{args.policy}.png"
    write_table(outcome, args, table)
    write_plot(outcome, args, plot)
    base, final = outcome.result.baseline, outcome.result.accepted
    if not args.quiet:
        console.print(
            f"parameters {base.parameters:,.0f} → {final.parameters:,.0f} "
            f"({_reduction(final.parameters, base.parameters):.1f}% fewer); test accuracy "
            f"{outcome.test_accuracy[0]:.2f} → {outcome.accepted_test_accuracy:.2f}; wrote {table} and {plot}"
        )
    return outcome


if __name__ == "__main__":
    main()
