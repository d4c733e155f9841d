"""Block-SPA (SPLoPA) against fine-pruning on digits: accuracy and bytes per task against block density.

    python -m examples.block_spa [--seeds 3] [--densities 0.5 0.3 0.1] [--epochs 25]
                                 [--rounds 2] [--tune-epochs 4] [--out examples/out]

Per seed a small vision transformer (:class:`DigitsViT`: 2 × 4-pixel patches of the
8 × 8 digits as 8 tokens, ``--depth`` pre-norm blocks of attention and an MLP built
from ``nn.Linear`` layers, mean pooling, a linear head) is pretrained on digits 0–4,
then adapted to digits 5–9 in two ways:

* **SPLoPA** (block-SPA): the transformer blocks' linear layers become
  :class:`~spa_kernels.nn.SPLoPALinear` layers with ``--block`` × ``--block`` weight
  blocks (:func:`spa_kernels.convert_splopa`): the base weights are frozen, and
  ``--prototypes`` low-rank prototypes shared by all layers plus per-layer position
  weights train, with the biases, the layer norms and a new head.  The patch and
  position embeddings stay frozen.
* **fine-pruning**: the plain network with a new head, every weight fine-tuned.

Both adapt ``--epochs`` epochs.  Then a copy of the SPLoPA network is block-pruned to
each ``--densities`` target in ``--rounds`` geometric steps
(:func:`~spa_kernels.pruning.block_pruning.iterative_block_prune`, magnitude of the
adapted blocks ``W + ΔW``, each layer pruned to the same fraction), training
``--tune-epochs`` epochs after each step.  The fine-pruning network replays the same
block masks, step by step: at each step it takes the SPLoPA network's masks and trains
every weight for the same epochs, so the two methods differ only in what they train
under one sparsity pattern.  (Its layers are SPLoPA layers too, with their adapters
zeroed and frozen and their weights trainable: the kernels then compute the masked
fine-tuned layer and its gradient, pruned blocks staying exactly zero.)  Density is
the fraction of the transformer blocks' weight blocks kept.

**Bytes per task.** SPLoPA: the task package
(:func:`~spa_kernels.pruning.package.save_task`: the block masks, the position weights
of the active blocks, the prototypes once, the biases, the layer norms and the head,
plus its JSON header), as ``task_size`` gives it, stored as raw values (the deflated
file, also reported, is what is written to ``--out``); loading it into a freshly
converted copy of the base must give the same test accuracy, which the run checks.
Fine-pruning: every parameter it trained, as raw float32, the pruned layers' weights
dense (zeros included) — what a fine-pruned copy stores without a sparse format; the
table also gives the values of its active blocks only.

Learning rates and epochs were chosen so that the default run takes a few minutes on
one thread; the test split is only reported.  Writes ``block_spa.png`` (accuracy and
bytes per task against density), ``block_spa.md`` (the table) and ``block_spa.json``
(every run) into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor, nn

import spa_kernels
from examples._digits import PRETRAIN_CLASSES, TASK_CLASSES, Split, accuracy, digits_split, train
from examples._versus_report import (
    check_run_args,
    density_label,
    progress_display,
    run_and_report,
    seed_groups,
    spread,
)
from spa_kernels.pruning.block_pruning import iterative_block_prune, splopa_layers
from spa_kernels.pruning.package import load_task, save_task, task_size

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
SPLOPA, FINE_PRUNING = "SPLoPA", "fine-pruning"
METHODS = (SPLOPA, FINE_PRUNING)
TABLE_NAME, PLOT_NAME, RESULTS_NAME = "block_spa.md", "block_spa.png", "block_spa.json"
PATCH = (2, 4)  # 8 tokens of 8 pixels each: widths the blocks divide
COLOURS = {SPLOPA: "C0", FINE_PRUNING: "C3"}
FLOAT32_BYTES = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1, one full run each (default 3)")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.3, 0.1],
                        help="fractions of the weight blocks kept, below 1 (default 0.5 0.3 0.1)")
    parser.add_argument("--epochs", type=int, default=25, help="adaptation epochs on digits 5-9 (default 25)")
    parser.add_argument("--rounds", type=int, default=2, help="pruning steps per density (default 2)")
    parser.add_argument("--tune-epochs", type=int, default=4, help="training epochs after each step (default 4)")
    parser.add_argument("--pretrain-epochs", type=int, default=25, help="epochs on digits 0-4 (default 25)")
    parser.add_argument("--lr-splopa", type=float, default=1e-2, help="Adam learning rate of SPLoPA (default 1e-2)")
    parser.add_argument("--lr-fine-pruning", type=float, default=2e-3,
                        help="Adam learning rate of fine-pruning (default 2e-3)")
    parser.add_argument("--width", type=int, default=32, help="token width of the transformer (default 32)")
    parser.add_argument("--depth", type=int, default=2, help="transformer blocks (default 2)")
    parser.add_argument("--block", type=int, default=8, help="weight blocks are B x B (default 8)")
    parser.add_argument("--prototypes", type=int, default=8, help="SPLoPA prototypes K (default 8)")
    parser.add_argument("--prototype-rank", type=int, default=2, help="rank of each prototype (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default examples/out)")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    args = parser.parse_args(argv)
    check_run_args(parser, args, ("seeds", "epochs", "rounds", "pretrain_epochs", "width", "depth", "block",
                                  "prototypes", "prototype_rank", "threads"), ("lr_splopa", "lr_fine_pruning"))
    if args.width % args.block or args.width % 4:
        parser.error("--block must divide --width, and --width must be a multiple of 4 (the attention heads)")
    return args


# ---------------------------------------------------------------------------- the network


class Attention(nn.Module):
    """Multi-head self-attention from two linear layers (qkv and the output projection)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.proj(attended.transpose(1, 2).reshape(batch, tokens, width))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + MLP(norm(x)) with a 2× wide hidden layer."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DigitsViT(nn.Module):
    """Patches of 2 × 4 pixels → linear embedding + position embedding → blocks → norm → mean → head."""

    def __init__(self, classes: int, width: int = 32, depth: int = 2, heads: int = 4):
        super().__init__()
        tokens = (8 // PATCH[0]) * (8 // PATCH[1])
        self.embed = nn.Linear(PATCH[0] * PATCH[1], width)
        self.position = nn.Parameter(torch.randn(tokens, width) * 0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(width, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, images: Tensor) -> Tensor:
        p, q = PATCH
        patches = images.reshape(-1, 8 // p, p, 8 // q, q).permute(0, 1, 3, 2, 4).reshape(images.shape[0], -1, p * q)
        x = self.blocks(self.embed(patches) + self.position)
        return self.head(self.norm(x).mean(dim=1))


def pretrained_base(args: argparse.Namespace, seed: int) -> DigitsViT:
    torch.manual_seed(seed)
    base = DigitsViT(len(PRETRAIN_CLASSES), width=args.width, depth=args.depth)
    train(base, digits_split(PRETRAIN_CLASSES, seed=seed), epochs=args.pretrain_epochs, lr=3e-3, seed=seed)
    return base


def with_new_head(base: DigitsViT, classes: int, seed: int) -> DigitsViT:
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    model.head = nn.Linear(model.head.in_features, classes)
    return model


def splopa_model(base: DigitsViT, classes: int, args: argparse.Namespace, seed: int) -> DigitsViT:
    """``base`` with a new head and SPLoPA transformer blocks; trains adapters, biases, norms and the head."""
    model = with_new_head(base, classes, seed)  # seeds the head and then the adapters drawn below
    model.requires_grad_(False)
    # New parameters train: the adapters, and the biases (copied into parameters of their own).
    model.blocks = spa_kernels.convert_splopa(model.blocks, num_prototypes=args.prototypes,
                                              block_shape=(args.block, args.block),
                                              prototype_rank=args.prototype_rank, inplace=True)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.requires_grad_(True)
    model.head.requires_grad_(True)
    return model


def masked_fine_tune_model(model: DigitsViT, args: argparse.Namespace) -> DigitsViT:
    """A copy of the fine-tuned ``model`` whose transformer blocks are masked, every weight still training.

    Its linear layers become SPLoPA layers with zero, frozen adapters: each computes
    the fine-tuned layer under its block mask, and the kernels give its weight the
    gradient of the active blocks only.
    """
    masked = copy.deepcopy(model)
    masked.blocks = spa_kernels.convert_splopa(masked.blocks, num_prototypes=1, block_shape=(args.block, args.block),
                                               inplace=True)
    masked.requires_grad_(True)
    for _, layer in splopa_layers(masked):
        layer.adapter.requires_grad_(False)
        with torch.no_grad():
            layer.adapter.pos_weights.zero_()
    return masked


# ---------------------------------------------------------------------------- what a task stores


def fine_pruning_bytes(model: nn.Module) -> tuple[int, int]:
    """(every trained value, dense; the same with the masked layers' active blocks only), in float32 bytes."""
    masked = {id(layer.weight): layer for _, layer in splopa_layers(model)}
    dense = active = 0
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        dense += parameter.numel()
        layer = masked.get(id(parameter))
        if layer is None:
            active += parameter.numel()
        else:
            p, q = layer.block_shape
            active += p * q * int(layer.block_mask.sum())
    return FLOAT32_BYTES * dense, FLOAT32_BYTES * active


@dataclass(frozen=True)
class Outcome:
    """One seed, method and target density (1.0: adapted, not pruned)."""

    seed: int
    method: str
    density: float  # reached: kept blocks over all blocks of the transformer blocks' layers
    target: float
    accuracy: float  # test, percent
    stored_bytes: int  # SPLoPA: task_size, raw values; fine-pruning: every trained value, dense
    deflated_bytes: int | None  # SPLoPA: the package file as written
    active_bytes: int | None  # fine-pruning: the masked layers' active blocks only


def block_density(model: nn.Module) -> float:
    masks = [layer.block_mask for _, layer in splopa_layers(model)]
    return sum(int(mask.sum()) for mask in masks) / sum(mask.numel() for mask in masks)


def measure_splopa(model: DigitsViT, fresh: DigitsViT, seed: int, target: float, task: Split,
                   package: Path | None) -> Outcome:
    """Accuracy and package size; the package loaded into ``fresh`` must give the same accuracy."""
    buffer = io.BytesIO()
    deflated = save_task(model, buffer)
    if package is not None:
        package.write_bytes(buffer.getvalue())
    got = accuracy(model, task)
    load_task(fresh, io.BytesIO(buffer.getvalue()))
    if accuracy(fresh, task) != got:
        raise RuntimeError("the task package did not reproduce the adapted network")
    return Outcome(seed, SPLOPA, block_density(model), target, got, task_size(model, compress=False), deflated, None)


def measure_fine_pruning(model: DigitsViT, seed: int, target: float, task: Split) -> Outcome:
    dense, active = fine_pruning_bytes(model)
    density = block_density(model) if list(splopa_layers(model)) else 1.0  # the plain network: unmasked
    return Outcome(seed, FINE_PRUNING, density, target, accuracy(model, task), dense, None, active)


# ---------------------------------------------------------------------------- one seed


def run_seed(args: argparse.Namespace, seed: int, step) -> list[Outcome]:
    step(f"seed {seed}: pretraining on digits 0-4")
    base = pretrained_base(args, seed)
    task = digits_split(TASK_CLASSES, seed=seed)
    classes = task.classes
    outcomes = []

    step(f"seed {seed}: SPLoPA adaptation to digits 5-9")
    adapted = splopa_model(base, classes, args, seed)
    train(adapted, task, epochs=args.epochs, lr=args.lr_splopa, seed=seed)
    fresh = splopa_model(base, classes, args, seed + 1000)  # another task's model on the same base
    outcomes.append(measure_splopa(adapted, fresh, seed, 1.0, task, None))

    step(f"seed {seed}: fine-pruning adaptation to digits 5-9")
    fine = with_new_head(base, classes, seed)
    fine.requires_grad_(True)
    train(fine, task, epochs=args.epochs, lr=args.lr_fine_pruning, seed=seed)
    outcomes.append(measure_fine_pruning(fine, seed, 1.0, task))

    for target in args.densities:
        step(f"seed {seed}: SPLoPA block pruning to density {target:g}")
        model = copy.deepcopy(adapted)
        masks: list[dict[str, Tensor]] = []  # the masks of every step, replayed by fine-pruning

        def tune(pruned: nn.Module, masks=masks) -> None:
            masks.append({name: layer.block_mask.clone() for name, layer in splopa_layers(pruned)})
            train(pruned, task, epochs=args.tune_epochs, lr=args.lr_splopa, seed=seed * 1000 + len(masks))

        iterative_block_prune(model, target, args.rounds, scope="layer", fine_tune=tune)
        package = args.out / f"block_spa_density{target:g}.spatask"
        outcomes.append(measure_splopa(model, fresh, seed, target, task, package))

        step(f"seed {seed}: fine-pruning under the same masks, density {target:g}")
        masked = masked_fine_tune_model(fine, args)
        layers = dict(splopa_layers(masked))
        for index, step_masks in enumerate(masks, start=1):
            for name, mask in step_masks.items():
                layers[name].set_masks(mask)
            train(masked, task, epochs=args.tune_epochs, lr=args.lr_fine_pruning, seed=seed * 1000 + index)
        outcomes.append(measure_fine_pruning(masked, seed, target, task))
    return outcomes


def run(args: argparse.Namespace, console: Console | None = None) -> list[Outcome]:
    args.out.mkdir(parents=True, exist_ok=True)
    steps_per_seed = 3 + 2 * len(args.densities)
    outcomes: list[Outcome] = []
    with progress_display(console, args.quiet) as progress:
        overall = progress.add_task("starting", total=steps_per_seed * args.seeds)
        started = [False]

        def step(description: str) -> None:
            if started[0]:
                progress.advance(overall)
            started[0] = True
            progress.update(overall, description=description)

        for seed in range(args.seeds):
            outcomes += run_seed(args, seed, step)
        progress.advance(overall)
        progress.update(overall, description="done")
    return outcomes


# ---------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Summary:
    method: str
    target: float
    seeds: int
    density: float
    accuracy: float
    accuracy_std: float
    stored_bytes: float
    deflated_bytes: float | None
    active_bytes: float | None


def _mean_or_none(values: list) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.fmean(present) if present else None


def summarise(outcomes: list[Outcome]) -> list[Summary]:
    summaries = []
    for target, method, group in seed_groups(outcomes, METHODS):
        accuracies = [o.accuracy for o in group]
        summaries.append(Summary(
            method, target, len(group), statistics.fmean(o.density for o in group), statistics.fmean(accuracies),
            spread(accuracies), statistics.fmean(o.stored_bytes for o in group),
            _mean_or_none([o.deflated_bytes for o in group]), _mean_or_none([o.active_bytes for o in group])))
    return summaries


def _bytes(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def write_table(outcomes: list[Outcome], args: argparse.Namespace, seconds: float, path: Path) -> None:
    summaries = summarise(outcomes)
    seeds = max(s.seeds for s in summaries)
    lines = [
        "# Block-SPA (SPLoPA) against fine-pruning on digits",
        "",
        f"Vision transformer of width {args.width}, {args.depth} blocks, 8 tokens of 2 × 4 pixels; pretrained "
        f"{args.pretrain_epochs} epochs on digits 0-4 per seed, adapted {args.epochs} epochs to digits 5-9 "
        f"(SPLoPA: {args.block} × {args.block} blocks, K = {args.prototypes} prototypes of rank "
        f"{args.prototype_rank}, lr {args.lr_splopa:g}; fine-pruning lr {args.lr_fine_pruning:g}), then "
        f"block-pruned by the magnitude of the adapted blocks in {args.rounds} step(s) with {args.tune_epochs} "
        "epoch(s) of training after each; fine-pruning trains every weight under the same masks.  Test "
        f"accuracy in percent, mean ± sample std over {seeds} seed(s).  *Bytes per task*: SPLoPA = "
        "`task_size(model, compress=False)` (block masks, active position weights, prototypes once, biases, "
        "norms, head, header; the deflated file in brackets); fine-pruning = every trained value as float32, "
        "masked weights dense (active blocks only in brackets).",
        "",
        "| method | target density | reached density | test accuracy (%) | bytes per task | (deflated / active only) |",
        "|---|---|---|---|---|---|",
    ]
    for s in summaries:
        extra = s.deflated_bytes if s.method == SPLOPA else s.active_bytes
        lines.append(f"| {s.method} | {density_label(s.target)} | {s.density:.3f} | {s.accuracy:.2f} ± {s.accuracy_std:.2f} "
                     f"| {_bytes(s.stored_bytes)} | {_bytes(extra)} |")
    lines += ["", "| target density | fine-pruning ÷ SPLoPA bytes | accuracy SPLoPA − fine-pruning (points) |",
              "|---|---|---|"]
    for target in sorted({s.target for s in summaries}, reverse=True):
        pair = {s.method: s for s in summaries if s.target == target}
        if SPLOPA in pair and FINE_PRUNING in pair:
            ratio = pair[FINE_PRUNING].stored_bytes / pair[SPLOPA].stored_bytes
            lines.append(f"| {density_label(target)} | {ratio:.1f}× | "
                         f"{pair[SPLOPA].accuracy - pair[FINE_PRUNING].accuracy:+.2f} |")
    lines += ["", f"{seconds:.0f} s in all.", ""]
    path.write_text("\n".join(lines))


def write_plot(outcomes: list[Outcome], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    summaries = summarise(outcomes)
    figure = Figure(figsize=(9.6, 4.0))
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    for method in METHODS:
        mine = [s for s in summaries if s.method == method]
        densities = [s.density for s in mine]
        left.errorbar(densities, [s.accuracy for s in mine], yerr=[s.accuracy_std for s in mine], fmt="o-",
                      color=COLOURS[method], capsize=3, label=method)
        right.plot(densities, [s.stored_bytes for s in mine], "o-", color=COLOURS[method], label=method)
        if method == FINE_PRUNING:
            right.plot(densities, [s.active_bytes for s in mine], "o--", color=COLOURS[method], alpha=0.6,
                       label=f"{method}, active blocks only")
    for ax in (left, right):
        ax.set_xlabel("block density (fraction of weight blocks kept)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    left.set_ylabel("test accuracy on digits 5-9 (%)")
    left.set_title("accuracy, mean ± std over seeds")
    right.set_yscale("log")
    right.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    right.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}" if str(int(value))[0] in "25"
                                                  else ""))
    right.set_ylabel("bytes per task (log scale)")
    right.set_title("what a task stores")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> list[Outcome]:
    return run_and_report(parse_args(argv), run, write_table, write_plot, (TABLE_NAME, PLOT_NAME, RESULTS_NAME))


if __name__ == "__main__":
    main()
