"""What :mod:`examples.spa_vs_finepruning` measures per run, and its table, plot and raw results.

The argument checks, the progress display, the timed run and the raw results file
serve :mod:`examples.block_spa` too: both compare an adapter method with fine-pruning
over seeds and densities the same way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

SPLORA, FINE_PRUNING = "SPLoRA", "fine-pruning"
METHODS = (SPLORA, FINE_PRUNING)
TABLE_NAME = "spa_vs_finepruning.md"
PLOT_NAME = "spa_vs_finepruning.png"
RESULTS_NAME = "spa_vs_finepruning.json"
# The target the comparison checks: at this density SPLoRA stores at least this many times fewer values per task.
TARGET_DENSITY = 0.1
TARGET_RATIO = 3.0
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
COLOURS = {SPLORA: "C0", FINE_PRUNING: "C3"}


@dataclass(frozen=True)
class Outcome:
    """One seed, method and target density (1.0: adapted, not pruned)."""

    seed: int
    method: str
    target: float
    density: float  # reached: kept prunable channels over prunable channels
    accuracy: float  # test, percent
    stored_layers: int  # converted layers, from accounting.stored_parameters
    stored_shared: int  # head and batch norms, the same for both methods
    package_bytes: int | None  # SPLoRA task package; None for fine-pruning

    @property
    def stored(self) -> int:
        return self.stored_layers + self.stored_shared


def spread(values: Sequence[float]) -> float:
    """Sample standard deviation; 0 for a single value."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class Summary:
    """One method at one target density, over the seeds."""

    method: str
    target: float
    seeds: int
    density: float
    accuracy: float
    accuracy_std: float
    stored: float
    stored_std: float
    stored_layers: float
    stored_shared: float
    package_bytes: float | None


def seed_groups(outcomes: Sequence, methods: Sequence[str]) -> Iterator[tuple[float, str, list]]:
    """``(target, method, the seeds' outcomes)``, densest target first, methods in order; no empty group."""
    for target in sorted({o.target for o in outcomes}, reverse=True):
        for method in methods:
            group = [o for o in outcomes if o.method == method and o.target == target]
            if group:
                yield target, method, group


def summarise(outcomes: Sequence[Outcome]) -> list[Summary]:
    """Mean and sample standard deviation over seeds per (method, target density), densest first."""
    summaries = []
    for target, method, group in seed_groups(outcomes, METHODS):
        sizes = [o.package_bytes for o in group if o.package_bytes is not None]
        summaries.append(Summary(
            method, target, len(group), statistics.fmean(o.density for o in group),
            statistics.fmean(o.accuracy for o in group), spread([o.accuracy for o in group]),
            statistics.fmean(o.stored for o in group), spread([o.stored for o in group]),
            statistics.fmean(o.stored_layers for o in group), statistics.fmean(o.stored_shared for o in group),
            statistics.fmean(sizes) if sizes else None,
        ))
    return summaries


def _pair(summaries: Sequence[Summary], target: float) -> tuple[Summary, Summary] | None:
    found = {s.method: s for s in summaries if s.target == target}
    return (found[SPLORA], found[FINE_PRUNING]) if SPLORA in found and FINE_PRUNING in found else None


def density_label(target: float) -> str:
    return "1 (not pruned)" if target == 1.0 else f"{target:g}"


def write_table(outcomes: Sequence[Outcome], args: argparse.Namespace, seconds: float, path: Path) -> None:
    summaries = summarise(outcomes)
    seeds = max(s.seeds for s in summaries)
    lines = [
        "# SPLoRA against fine-pruning on digits",
        "",
        f"Residual CNN, {args.blocks} blocks of width {args.width}, pretrained {args.pretrain_epochs} epochs on "
        f"digits 0-4 per seed; adapted {args.epochs} epochs to digits 5-9 (SPLoRA rank {args.rank}, "
        f"lr {args.lr_splora:g}; fine-pruning lr {args.lr_fine_pruning:g}), then pruned by weight magnitude "
        f"in {args.rounds} rounds with {args.tune_epochs} epoch(s) of fine-tuning after each.  Test accuracy "
        f"in percent, mean ± sample std over {seeds} seed(s).  *Stored per task* = converted layers "
        "(`stored_parameters`: adapters and biases for SPLoRA, pruned weights for fine-pruning) + head and "
        "batch-norm affine parameters, the latter added to both methods in full.  *Density* = fraction of "
        "the prunable channels (inner channels of the residual blocks) kept.  The SPLoRA package bytes "
        "are the whole `save_task` file: JSON header, masks, active adapter entries, and the head and batch "
        "norms with their running statistics.",
        "",
        "| method | target density | reached density | test accuracy (%) | stored per task | converted layers "
        "| head + BN | SPLoRA package (bytes) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        package = f"{s.package_bytes:,.0f}" if s.package_bytes is not None else "—"
        lines.append(f"| {s.method} | {density_label(s.target)} | {s.density:.3f} | {s.accuracy:.2f} ± "
                     f"{s.accuracy_std:.2f} | {s.stored:,.0f} | {s.stored_layers:,.0f} | {s.stored_shared:,.0f} "
                     f"| {package} |")
    lines += ["", "| target density | fine-pruning ÷ SPLoRA stored | same, converted layers only "
              "| accuracy SPLoRA − fine-pruning (points) |", "|---|---|---|---|"]
    for target in sorted({s.target for s in summaries}, reverse=True):
        pair = _pair(summaries, target)
        if pair is None:
            continue
        splora, fine = pair
        lines.append(f"| {density_label(target)} | {fine.stored / splora.stored:.2f}× | "
                     f"{fine.stored_layers / splora.stored_layers:.2f}× | {splora.accuracy - fine.accuracy:+.2f} |")
    pair = _pair(summaries, TARGET_DENSITY)
    if pair is not None:
        ratio = pair[1].stored / pair[0].stored
        verdict = "met" if ratio >= TARGET_RATIO else "missed"
        lines += ["", f"Target: at density {TARGET_DENSITY:g} SPLoRA stores at least {TARGET_RATIO:g}× fewer "
                  f"values per task than fine-pruning: {ratio:.2f}×, {verdict}."]
    lines += ["", f"{seconds:.0f} s in all.", ""]
    path.write_text("\n".join(lines))


def write_plot(outcomes: Sequence[Outcome], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    summaries = summarise(outcomes)
    targets = sorted({s.target for s in summaries}, reverse=True)
    marker = {target: MARKERS[i % len(MARKERS)] for i, target in enumerate(targets)}
    figure = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    for method in METHODS:
        mine = [s for s in summaries if s.method == method]
        if not mine:
            continue
        ax.plot([s.stored for s in mine], [s.accuracy for s in mine], "-", color=COLOURS[method], lw=1, alpha=0.5)
        for s in mine:
            ax.errorbar(s.stored, s.accuracy, xerr=s.stored_std, yerr=s.accuracy_std, fmt=marker[s.target],
                        color=COLOURS[method], ms=7, capsize=3)
    ax.set_xscale("log")
    # a log range of barely two decades: label 1, 2 and 5 of every decade in plain numbers
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("stored parameters per task (log scale)")
    ax.set_ylabel("test accuracy on digits 5-9 (%)")
    ax.set_title("SPLoRA vs fine-pruning: mean ± std over seeds")
    handles = [Line2D([], [], color=COLOURS[m], lw=2, label=m) for m in METHODS]
    handles += [Line2D([], [], color="grey", ls="", marker=marker[t], label=f"density {density_label(t)}")
                for t in targets]
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def write_results(rows: list[dict], args: argparse.Namespace, seconds: float, path: Path) -> None:
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    path.write_text(json.dumps({"settings": settings, "seconds": seconds, "runs": rows}, indent=1) + "\n")


# ---------------------------------------------------------------------------- shared by the versus examples


def check_run_args(parser: argparse.ArgumentParser, args: argparse.Namespace, counts: Sequence[str],
                   learning_rates: Sequence[str]) -> None:
    """Reject counts below 1, negative ``--tune-epochs``, densities outside (0, 1) and non-positive learning
    rates through ``parser``; sort the densities densest first, without repeats."""
    for name in counts:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.tune_epochs < 0:
        parser.error("--tune-epochs must be at least 0")
    if any(not 0.0 < density < 1.0 for density in args.densities):
        parser.error("--densities must lie in (0, 1); the unpruned network (density 1) is always measured")
    if any(getattr(args, name) <= 0 for name in learning_rates):
        parser.error("learning rates must be positive")
    args.densities = sorted(set(args.densities), reverse=True)


def progress_display(console: Console | None, quiet: bool) -> Progress:
    """A spinner, the current step, a bar and the steps done, silent when ``quiet``."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    return Progress(*columns, console=console, disable=quiet)


def run_and_report(args: argparse.Namespace, run: Callable[[argparse.Namespace, Console], list],
                   write_table: Callable[[list, argparse.Namespace, float, Path], None],
                   write_plot: Callable[[list, Path], None], names: tuple[str, str, str]) -> list:
    """``run(args, console)`` on ``args.threads`` torch threads, then the table, plot and raw results it names.

    ``names`` are the table, plot and results file names inside ``args.out``; the
    outcomes are dataclasses, written to the results one dictionary a run.
    """
    console = Console()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        outcomes = run(args, console)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - started
    table, plot, results = (args.out / name for name in names)
    write_table(outcomes, args, seconds, table)
    write_plot(outcomes, plot)
    write_results([asdict(outcome) for outcome in outcomes], args, seconds, results)
    if not args.quiet:
        console.print(table.read_text(), markup=False, highlight=False)
        console.print(f"wrote {table}, {plot} and {results}")
    return outcomes
