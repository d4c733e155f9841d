"""SPLoRA against fine-pruning on digits: accuracy and stored parameters per task (arXiv 2211.10155).

    python -m examples.spa_vs_finepruning [--seeds 5] [--densities 0.5 0.3 0.1]
                                          [--epochs 8] [--rounds 2] [--out examples/out]

Per seed a residual CNN is pretrained on digits 0–4 (once, shared by every run of
that seed), then adapted to digits 5–9 in two ways and pruned by whole channels:

* **SPLoRA**: the base convolutions are frozen and get rank-``--rank`` adapters; the
  adapters, batch norms and a new head train.  Per task it stores the active part
  of the adapters (``r·(|S| + |O|)`` values per layer).
* **fine-pruning** (the paper's baseline): the plain torch network with a new head,
  every weight fine-tuned.  To prune it with the same machinery it is then
  converted with :func:`spa_kernels.convert`, its adapters zeroed and frozen and its
  weights made trainable again, so pruning and the fine-tuning between rounds are
  a plain masked fine-tune.  Per task it stores the pruned weights (``|O|·|S|·k``
  values per layer).

Both adapt for ``--epochs`` epochs, then :func:`~spa_kernels.pruning.schedule.iterative_prune`
takes each copy of the adapted network to every ``--densities`` target in ``--rounds``
rounds, fine-tuning ``--tune-epochs`` epochs after each round.  Density is the fraction
of prunable channels kept.  The prunable channels are the inner channels of the
residual blocks (``conv1`` out, ``conv2`` in): the residual stream reaches the plain
linear head, which holds no mask, so :func:`~spa_kernels.pruning.groups.channel_groups`
leaves it whole, for both methods alike.

**Criterion: weight magnitude** (:class:`~spa_kernels.pruning.criteria.MagnitudeCriterion`,
L2 norm of each output filter, normalised per layer), the paper's *weight* criterion,
one of the four it evaluates for SPA (weight, gradient, Taylor, LRP).  It scores
what each method actually deploys: the adapted filter ``W + B·A`` for SPLoRA, the
fine-tuned filter ``W`` for fine-pruning (its adapter is zero), so the comparison
is of the methods, not of two different scorings.  It needs no data, so nothing
depends on which batches are fed, and its per-layer normalisation makes the
global ranking across blocks fair; the Taylor scores of the package are not
normalised per layer and would favour some blocks in a global ranking.

**Stored parameters per task**: :func:`~spa_kernels.pruning.accounting.stored_parameters`
of the converted layers (``method=None`` for SPLoRA, ``"fine-pruning"`` for the
baseline), plus the head and the batch-norm affine parameters, added to both sides
in full (both methods train them; pruned channels' entries are counted too, the
same number on both sides).  The masks and the batch-norm running statistics are
not counted.  The SPLoRA task package (:func:`~spa_kernels.pruning.package.save_task`,
head and batch norms as task-specific modules) is written into ``--out`` and its
size in bytes reported.

After every training phase (adaptation, each round's fine-tuning) the batch-norm
running statistics are re-estimated on the training images, for both methods
(:func:`recalibrate_batch_norms`): with ten batches an epoch, the running averages
trail far behind a network whose channels were just pruned.

Learning rates (``--lr-splora``, ``--lr-fine-pruning``), epochs and rounds were
chosen on a validation part (the last 20%) of the training images of seeds 0–2,
with the run time of the defaults kept to a few minutes; the test split is only
reported.  One torch thread by default: these networks are small, and on a
shared 2-core machine two threads ran one seed about eight times slower than one.

Writes ``spa_vs_finepruning.png`` (test accuracy against stored parameters per
task, log x axis), ``spa_vs_finepruning.md`` (the table) and
``spa_vs_finepruning.json`` (every run) into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

import spa_kernels
from examples._digits import (
    TASK_CLASSES,
    DigitsNet,
    Split,
    accuracy,
    digits_split,
    pretrained_base,
    splora_task_model,
    train,
    with_new_head,
)
from examples._versus_report import (
    FINE_PRUNING,
    METHODS,
    PLOT_NAME,
    RESULTS_NAME,
    SPLORA,
    TABLE_NAME,
    Outcome,
    check_run_args,
    progress_display,
    run_and_report,
    write_plot,
    write_table,
)
from spa_kernels.pruning._layers import spa_layers
from spa_kernels.pruning.accounting import stored_parameters
from spa_kernels.pruning.criteria import MagnitudeCriterion
from spa_kernels.pruning.groups import channel_groups
from spa_kernels.pruning.package import save_task
from spa_kernels.pruning.schedule import iterative_prune

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
ACCOUNTING = {SPLORA: None, FINE_PRUNING: "fine-pruning"}  # the ``method`` of stored_parameters


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1, one full run each (default 5)")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.3, 0.1],
                        help="fractions of the prunable channels kept, below 1 (default 0.5 0.3 0.1)")
    parser.add_argument("--epochs", type=int, default=8, help="adaptation epochs on digits 5-9 (default 8)")
    parser.add_argument("--rounds", type=int, default=2, help="pruning rounds per density (default 2)")
    parser.add_argument("--tune-epochs", type=int, default=2,
                        help="fine-tuning epochs after each pruning round (default 2)")
    parser.add_argument("--pretrain-epochs", type=int, default=5, help="epochs on digits 0-4 (default 5)")
    parser.add_argument("--lr-splora", type=float, default=1e-2, help="Adam learning rate of SPLoRA (default 1e-2)")
    parser.add_argument("--lr-fine-pruning", type=float, default=3e-3,
                        help="Adam learning rate of fine-pruning (default 3e-3)")
    parser.add_argument("--rank", type=int, default=4, help="SPLoRA adapter rank (default 4)")
    parser.add_argument("--width", type=int, default=32, help="channels of the network (default 32)")
    parser.add_argument("--blocks", type=int, default=4, help="residual blocks of the network (default 4)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a busy 2-core machine two ran far slower)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default examples/out)")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    args = parser.parse_args(argv)
    check_run_args(parser, args, ("seeds", "epochs", "rounds", "pretrain_epochs", "rank", "width", "blocks",
                                  "threads"), ("lr_splora", "lr_fine_pruning"))
    return args


# ---------------------------------------------------------------------------- the two task models


def fine_tuned_model(base: DigitsNet, classes: int, seed: int = 0) -> DigitsNet:
    """``base`` with the same new head as ``splora_task_model`` and every parameter trainable (plain torch)."""
    model = with_new_head(base, classes, seed)
    model.requires_grad_(True)
    return model


def masked_fine_tune_model(model: DigitsNet) -> DigitsNet:
    """A converted copy of the fine-tuned ``model`` that prunes with the SPA machinery and keeps fine-tuning.

    The convolutions become SPA layers whose weights stay trainable (the kernels
    compute the gradient of the active block only) and whose adapters are zero and
    frozen, so the layer computes exactly the fine-tuned convolution under its
    masks.  The head stays the plain trained linear layer, as in the SPLoRA model,
    so both methods have the same channel groups.
    """
    converted = spa_kernels.convert(model, rank=1)
    converted.head = copy.deepcopy(model.head)
    for layer in spa_layers(converted).values():
        layer.weight.requires_grad_(True)
        for parameter in layer.adapter.parameters():
            parameter.requires_grad_(False)
            with torch.no_grad():
                parameter.zero_()
    return converted


@torch.no_grad()
def recalibrate_batch_norms(model: nn.Module, images: torch.Tensor) -> None:
    """Re-estimate every batch norm's running statistics as the plain average over ``images``.

    Training runs a few batches per epoch, and the running averages (momentum 0.1)
    trail far behind a network that just changed (new task, pruned channels); the
    evaluation would measure the stale statistics rather than the network.  One
    forward pass in training mode with a cumulative average fixes that; it changes
    no parameter.  Both methods get it after every training phase.
    """
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    training = model.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches seen
    model.train()
    model(images)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.train(training)


def adapted_model(method: str, base: DigitsNet, task: Split, epochs: int, lr: float, rank: int,
                  seed: int) -> DigitsNet:
    """``base`` adapted to ``task`` by ``method``, ready for pruning (converted, masks all True)."""
    if method == SPLORA:
        model = splora_task_model(base, task.classes, rank=rank, seed=seed)
        train(model, task, epochs=epochs, lr=lr, seed=seed)
        recalibrate_batch_norms(model, task.x_train)
        return model
    if method == FINE_PRUNING:
        model = fine_tuned_model(base, task.classes, seed=seed)
        train(model, task, epochs=epochs, lr=lr, seed=seed)
        recalibrate_batch_norms(model, task.x_train)
        return masked_fine_tune_model(model)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def shared_parameters(model: nn.Module) -> int:
    """Head and batch-norm parameters: trained per task by both methods, counted for both in full."""
    plain = [module for module in model.modules()
             if isinstance(module, (nn.Linear, nn.modules.batchnorm._BatchNorm))
             and not isinstance(module, spa_kernels.nn.ChannelMasked)]
    return sum(parameter.numel() for module in plain for parameter in module.parameters(recurse=False))


def task_specific_modules(model: nn.Module) -> list[str]:
    """Names of the head and the batch norms: what a SPLoRA task package stores whole."""
    return [name for name, module in model.named_modules()
            if name and isinstance(module, (nn.Linear, nn.modules.batchnorm._BatchNorm))
            and not isinstance(module, spa_kernels.nn.ChannelMasked)]


# ---------------------------------------------------------------------------- one run


def _no_batches(model: nn.Module) -> None:
    """The magnitude criterion reads the weights only: scoring runs no batch."""


def prune_to(model: nn.Module, groups, density: float, rounds: int,
             fine_tune: Callable[[nn.Module, int], object] | None) -> float:
    """Prune ``model`` to ``density`` by weight magnitude in ``rounds`` rounds; return the density reached."""
    reports = iterative_prune(model, MagnitudeCriterion(), _no_batches, density, rounds, fine_tune=fine_tune,
                              groups=groups, progress=False)
    return reports[-1].density


def _measure(model: nn.Module, method: str, seed: int, target: float, density: float, task: Split,
             package: Path | None) -> Outcome:
    package_bytes = None
    if method == SPLORA and package is not None:
        package_bytes = save_task(model, package, task_specific=task_specific_modules(model))
    return Outcome(seed, method, target, density, accuracy(model, task),
                   stored_parameters(model, method=ACCOUNTING[method]), shared_parameters(model), package_bytes)


def _tuner(task: Split, epochs: int, lr: float, seed: int, before: Callable[[int], None],
           after: Callable[[], None]) -> Callable[[nn.Module, int], None]:
    """The ``fine_tune`` of :func:`iterative_prune`: ``epochs`` epochs after each round, a seed per round."""

    def fine_tune(model: nn.Module, round_: int) -> None:
        before(round_)
        train(model, task, epochs=epochs, lr=lr, seed=seed * 1000 + round_ + 1)
        recalibrate_batch_norms(model, task.x_train)
        after()

    return fine_tune


def run(args: argparse.Namespace, console: Console | None = None) -> list[Outcome]:
    """Every seed: pretrain; per method adapt, then prune a copy of the adapted network to every density."""
    args.out.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    steps_per_seed = 1 + len(METHODS) * (1 + len(args.densities) * args.rounds)
    with progress_display(console, args.quiet) as progress:
        overall = progress.add_task("starting", total=steps_per_seed * args.seeds)

        def step(description: str) -> None:
            progress.update(overall, description=description)

        def done() -> None:
            progress.advance(overall)

        for seed in range(args.seeds):
            step(f"seed {seed}: pretraining on digits 0-4")
            base = pretrained_base(seed=seed, width=args.width, blocks=args.blocks, epochs=args.pretrain_epochs)
            task = digits_split(TASK_CLASSES, seed=seed)
            done()
            for method in METHODS:
                lr = args.lr_splora if method == SPLORA else args.lr_fine_pruning
                step(f"seed {seed}: {method} adaptation to digits 5-9")
                adapted = adapted_model(method, base, task, args.epochs, lr, args.rank, seed)
                outcomes.append(_measure(adapted, method, seed, 1.0, 1.0, task, None))
                groups = channel_groups(adapted, task.x_train[:2])
                done()
                for target in args.densities:
                    label = f"seed {seed}: {method} at density {target:g}"
                    fine_tune = _tuner(task, args.tune_epochs, lr, seed,
                                       lambda round_, label=label: step(f"{label}, round {round_ + 1}"), done)
                    model = copy.deepcopy(adapted)
                    density = prune_to(model, groups, target, args.rounds, fine_tune)
                    package = args.out / f"spa_vs_finepruning_density{target:g}.spatask"
                    outcomes.append(_measure(model, method, seed, target, density, task, package))
        step("done")
    return outcomes


def main(argv: list[str] | None = None) -> list[Outcome]:
    return run_and_report(parse_args(argv), run, write_table, write_plot, (TABLE_NAME, PLOT_NAME, RESULTS_NAME))


if __name__ == "__main__":
    main()
