"""Layer-wise pruning (SLS, arXiv 2407.14330) of a SPLoRA-adapted network on digits.

    python -m examples.layerwise_sls [--seeds 0 1] [--alpha 0.9] [--blocks 8]
                                     [--embeddings pca tsne] [--out examples/out]

A residual CNN with ``--blocks`` equal-width blocks is pretrained on digits 0–4, then
adapted to digits 5–9 with SPLoRA (frozen base convolutions, rank-4 adapters; the
batch norms and the head train too).  Each block of the adapted network is scored
on the task's training images by the silhouette of a 2-D embedding (PCA and t-SNE)
of its globally pooled features against the labels
(:func:`spa_kernels.pruning.layerwise.block_scores`).  The depth rule
(:func:`~spa_kernels.pruning.layerwise.choose_depth`) keeps the blocks up to the
shallowest block of the final run scoring at least ``alpha × score of the last
block``; the deeper blocks are cut off (never run), and the adapters, batch norms
and head are retrained for ``--retrain-epochs``.

Why ``alpha = 0.9`` by default: the deep blocks' scores flatten into a plateau, and
the rule is meant to cut where the plateau starts.  A threshold close to 1 asks the
kept prefix to separate the classes nearly as well as the whole network (the short
retraining of adapters and head cannot be expected to make up a large gap), and
the 10% margin exceeds the block-to-block noise of a 2-D silhouette on the
plateau.  The paper's 0.3 was set for ViT-B, whose early layers barely separate
the classes at all; here the first blocks already reach 0.3 × the last score,
so 0.3 would keep one or two blocks.  Nothing is chosen on the test split: it
is only reported.

Run time: about 80 s of CPU time per seed with one thread (t-SNE and the SPLoRA
training take most of it), so the default two seeds take two to three minutes on
two cores.  On a machine shared with other jobs ``--threads 1`` avoids thread
oversubscription, which can slow PyTorch and scikit-learn down many times over.

Accuracies are on the held-out test split of digits 5–9.  As a control, the full
network is also retrained for the same extra epochs, so the change measured by
truncation is not confounded with the extra training.

Writes ``layerwise_sls.png`` (per-block scores, the ``alpha × last`` threshold and
the chosen depth, one panel per embedding) and ``layerwise_sls.md`` (the results
table and the per-block scores) into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from examples._digits import (
    TASK_CLASSES,
    DigitsNet,
    Split,
    accuracy,
    digits_split,
    pretrained_base,
    splora_task_model,
    train,
)
from spa_kernels.pruning.layerwise import EMBEDDINGS, block_scores, choose_depth, truncate

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
TABLE_NAME = "layerwise_sls.md"
PLOT_NAME = "layerwise_sls.png"
TABLE_COLUMNS = (
    "seed",
    "embedding",
    "kept blocks",
    "dropped",
    "full (%)",
    "truncated, not retrained (%)",
    "truncated + retrained (%)",
    "change (points)",
    "full + same retraining (%)",
)
# The target this example is held to.
TARGET_DROPPED = 0.30
TARGET_MAX_LOSS = 1.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                        help="seeds, one full run each: pretraining, data split, adaptation (default 0 1)")
    parser.add_argument("--alpha", type=float, default=0.9,
                        help="depth-rule threshold as a fraction of the last block's score (default 0.9)")
    parser.add_argument("--embeddings", nargs="+", choices=EMBEDDINGS, default=list(EMBEDDINGS),
                        help="2-D embeddings to score the blocks with (default pca tsne)")
    parser.add_argument("--blocks", type=int, default=8, help="residual blocks of the network (default 8)")
    parser.add_argument("--width", type=int, default=32, help="channels of the network (default 32)")
    parser.add_argument("--rank", type=int, default=4, help="SPLoRA adapter rank (default 4)")
    parser.add_argument("--pretrain-epochs", type=int, default=12, help="epochs on digits 0-4 (default 12)")
    parser.add_argument("--adapt-epochs", type=int, default=12, help="SPLoRA epochs on digits 5-9 (default 12)")
    parser.add_argument("--retrain-epochs", type=int, default=5,
                        help="epochs of adapters, batch norms and head after truncation (default 5)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice; 1 is faster on a busy machine)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default examples/out)")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    args = parser.parse_args(argv)
    for name in ("blocks", "width", "rank", "pretrain_epochs", "adapt_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.retrain_epochs < 0:
        parser.error("--retrain-epochs must be at least 0")
    if not 0.0 <= args.alpha <= 1.0:
        parser.error("--alpha must lie in [0, 1]")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    args.embeddings = list(dict.fromkeys(args.embeddings))
    return args


@dataclass(frozen=True)
class Outcome:
    """One seed and one embedding: the scores, the chosen depth and the accuracies (percent)."""

    seed: int
    embedding: str
    scores: list[float]
    threshold: float
    depth: int
    full: float
    truncated: float
    retrained: float
    full_retrained: float

    @property
    def blocks(self) -> int:
        return len(self.scores)

    @property
    def dropped(self) -> float:
        return 1.0 - self.depth / self.blocks

    @property
    def change(self) -> float:
        return self.retrained - self.full


def _retrained(model: DigitsNet, depth: int | None, task: Split, epochs: int, seed: int) -> tuple[float, float]:
    """Accuracy of a copy of ``model`` cut to ``depth`` blocks (None: all), before and after retraining."""
    model = copy.deepcopy(model)
    if depth is not None:
        truncate(model, "blocks", depth)
    before = accuracy(model, task)
    if epochs:
        train(model, task, epochs=epochs, seed=seed)
    return before, accuracy(model, task)


def run(args: argparse.Namespace, console: Console | None = None) -> list[Outcome]:
    """Every seed: pretrain, adapt, score each block per embedding, truncate, retrain."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    steps_per_seed = 3 + 2 * len(args.embeddings)
    outcomes: list[Outcome] = []
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=args.quiet, transient=False) as progress:
        overall = progress.add_task("starting", total=steps_per_seed * len(args.seeds))

        def step(description: str) -> None:
            progress.update(overall, description=description)

        for seed in args.seeds:
            step(f"seed {seed}: pretraining on digits 0-4")
            base = pretrained_base(seed=seed, width=args.width, blocks=args.blocks, epochs=args.pretrain_epochs)
            progress.advance(overall)

            step(f"seed {seed}: SPLoRA adaptation to digits 5-9")
            task = digits_split(TASK_CLASSES, seed=seed)
            model = splora_task_model(base, task.classes, rank=args.rank, seed=seed)
            train(model, task, epochs=args.adapt_epochs, seed=seed)
            full = accuracy(model, task)
            progress.advance(overall)

            step(f"seed {seed}: retraining the full network (control)")
            _, full_retrained = _retrained(model, None, task, args.retrain_epochs, seed)
            progress.advance(overall)

            by_depth: dict[int, tuple[float, float]] = {}
            for embedding in args.embeddings:
                step(f"seed {seed}: scoring {args.blocks} blocks ({embedding})")
                scores = block_scores(model, "blocks", task.x_train, task.y_train, embedding=embedding, seed=seed)
                depth = choose_depth(scores, args.alpha)
                progress.advance(overall)

                step(f"seed {seed}: retraining {depth} of {args.blocks} blocks ({embedding})")
                if depth not in by_depth:  # both embeddings may pick the same depth: the run is deterministic
                    by_depth[depth] = _retrained(model, depth, task, args.retrain_epochs, seed)
                truncated, retrained = by_depth[depth]
                progress.advance(overall)
                outcomes.append(Outcome(seed, embedding, scores, args.alpha * scores[-1], depth, full, truncated,
                                        retrained, full_retrained))
        step("done")
    return outcomes


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def write_table(outcomes: list[Outcome], args: argparse.Namespace, seconds: float, path: Path) -> None:
    lines = [
        "# Layer-wise pruning (SLS) of a SPLoRA-adapted network on digits",
        "",
        f"{args.blocks} residual blocks of width {args.width}, SPLoRA rank {args.rank}; pretrained "
        f"{args.pretrain_epochs} epochs on digits 0-4, adapted {args.adapt_epochs} epochs to digits 5-9, "
        f"retrained {args.retrain_epochs} epochs after truncation (adapters, batch norms, head).  "
        f"Depth rule: keep up to the shallowest block of the final run scoring at least "
        f"alpha × last block's score, alpha = {args.alpha:g}.  Accuracies in percent on the test split; "
        f"*change* = truncated + retrained − full.",
        "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|",
    ]

    def row(seed: str, embedding: str, kept: str, group: list[Outcome]) -> str:
        cells = [seed, embedding, kept, f"{_mean([o.dropped for o in group]):.0%}",
                 f"{_mean([o.full for o in group]):.2f}", f"{_mean([o.truncated for o in group]):.2f}",
                 f"{_mean([o.retrained for o in group]):.2f}", f"{_mean([o.change for o in group]):+.2f}",
                 f"{_mean([o.full_retrained for o in group]):.2f}"]
        return "| " + " | ".join(cells) + " |"

    for o in outcomes:
        lines.append(row(str(o.seed), o.embedding, f"{o.depth} of {o.blocks}", [o]))
    verdicts = []
    for embedding in args.embeddings:
        group = [o for o in outcomes if o.embedding == embedding]
        kept = f"{_mean([o.depth for o in group]):.1f} of {group[0].blocks}"
        lines.append(row("mean", embedding, kept, group))
        dropped, change = _mean([o.dropped for o in group]), _mean([o.change for o in group])
        control = _mean([o.retrained - o.full_retrained for o in group])
        met = dropped >= TARGET_DROPPED and change >= -TARGET_MAX_LOSS
        verdicts.append(
            f"- {embedding}: {dropped:.0%} of the blocks dropped; accuracy change {change:+.2f} points on "
            f"average (worst seed {min(o.change for o in group):+.2f}; {control:+.2f} against the full network "
            f"given the same retraining): target {'met' if met else 'missed'}."
        )
    lines += ["", f"Target: at least {TARGET_DROPPED:.0%} of the blocks dropped with at most "
              f"{TARGET_MAX_LOSS:g} points of accuracy lost after retraining (means over the seeds).", ""]
    lines += verdicts
    lines += ["", "## Per-block scores (silhouette of the 2-D embedding)", "",
              "| seed | embedding | " + " | ".join(f"block {i + 1}" for i in range(args.blocks)) + " | threshold |",
              "|" + "|".join("---" for _ in range(args.blocks + 3)) + "|"]
    for o in outcomes:
        cells = [f"**{s:.3f}**" if i == o.depth - 1 else f"{s:.3f}" for i, s in enumerate(o.scores)]
        lines.append(f"| {o.seed} | {o.embedding} | " + " | ".join(cells) + f" | {o.threshold:.3f} |")
    lines += ["", "The last kept block is in bold.", "", f"{seconds:.0f} s in all.", ""]
    path.write_text("\n".join(lines))


def write_plot(outcomes: list[Outcome], args: argparse.Namespace, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.0 * len(args.embeddings), 3.8))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(args.embeddings), squeeze=False)[0]
    colours = [f"C{i % 10}" for i in range(len(args.seeds))]
    blocks = list(range(1, args.blocks + 1))
    for ax, embedding in zip(axes, args.embeddings, strict=True):
        for colour, seed in zip(colours, args.seeds, strict=True):
            for o in outcomes:
                if o.seed != seed or o.embedding != embedding:
                    continue
                ax.plot(blocks, o.scores, "o-", color=colour, lw=1.5, ms=4, label=f"seed {seed}")
                ax.axhline(o.threshold, color=colour, ls="--", lw=1)
                ax.plot([o.depth], [o.scores[o.depth - 1]], "s", color=colour, ms=11, mfc="none", mew=1.5)
                ax.axvline(o.depth + 0.5, color=colour, ls=":", lw=1)
        ax.set_title(f"{embedding}: dashed {args.alpha:g} × last score, square last kept block, dotted cut",
                     fontsize=9)
        ax.set_xlabel("block")
        ax.set_ylabel("silhouette of the 2-D embedding")
        ax.set_xticks(blocks)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> list[Outcome]:
    args = parse_args(argv)
    console = Console()
    started = time.perf_counter()
    outcomes = run(args, console)
    seconds = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    table, plot = args.out / TABLE_NAME, args.out / PLOT_NAME
    write_table(outcomes, args, seconds, table)
    write_plot(outcomes, args, plot)
    if not args.quiet:
        console.print(table.read_text(), markup=False, highlight=False)
        console.print(f"wrote {table} and {plot}")
    return outcomes


if __name__ == "__main__":
    main()
