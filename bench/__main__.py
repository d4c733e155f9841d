"""``python -m bench``: run the benchmark suites, print their tables, optionally save them.

    python -m bench                      # CPU, fp32, 2 threads, every keep ratio
    python -m bench --quick              # a few samples per cell (smoke test)
    python -m bench --device cuda        # bf16, the GPU shape set
    python -m bench --keep 0.5 0.1 --threads 4 --save
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

import spa_kernels

from . import RunConfig, Suite
from .anchors import ContenderMismatch
from .block import SUITE as BLOCK_SUITE
from .compiled import COMPILE_MODES
from .conv import SUITE as CONV_SUITE
from .conv_layers import SUITE as CONV_LAYERS_SUITE
from .linear import SUITE as LINEAR_SUITE
from .network import SUITE as NETWORK_SUITE
from .overhead import SUITE as OVERHEAD_SUITE
from .report import device_name, print_reports, results_path, save, to_markdown
from .resnet50 import SUITE as RESNET50_SUITE
from .shapes import CPU_THREADS, DTYPES, KEEP_RATIOS
from .task_switch import SUITE as TASK_SUITE
from .timing import DEFAULT_BUDGET, QUICK_BUDGET, set_cpu_threads
from .transformer import SUITE as TRANSFORMER_SUITE
from .transformer_fastpath import SUITE as FASTPATH_SUITE

SUITES: dict[str, Suite] = {suite.name: suite for suite in (LINEAR_SUITE, CONV_SUITE, CONV_LAYERS_SUITE, NETWORK_SUITE, TASK_SUITE,
                                                             BLOCK_SUITE, TRANSFORMER_SUITE, FASTPATH_SUITE,
                                                             RESNET50_SUITE, OVERHEAD_SUITE)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0].strip("`: "))
    parser.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16, GPU shapes); default cpu")
    parser.add_argument("--threads", type=int, default=CPU_THREADS,
                        help=f"CPU threads for PyTorch and the cpu backend (default {CPU_THREADS})")
    parser.add_argument("--keep", type=float, nargs="+", default=list(KEEP_RATIOS), metavar="RATIO",
                        help="keep ratios, the same for inputs and outputs (default: %(default)s)")
    parser.add_argument("--suite", nargs="+", choices=sorted(SUITES), default=list(SUITES),
                        help="suites to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="a few samples per cell, for smoke tests")
    parser.add_argument("--seconds", type=float, default=None,
                        help=f"sampling time per cell (default {DEFAULT_BUDGET.max_s} s)")
    parser.add_argument("--compiled", choices=COMPILE_MODES, default="auto",
                        help="torch.compile vs eager rows of the resnet50 and transformer suites: yes, no, or auto "
                             "(only when the suite is within its time budget; default)")
    parser.add_argument("--save", action="store_true",
                        help="write the tables to bench/results/<device-name>-<date>.md")
    args = parser.parse_args(argv)
    for keep in args.keep:
        if not 0.0 < keep <= 1.0:
            parser.error(f"--keep ratios must lie in (0, 1], got {keep}")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


class ProgressBar:
    """The :class:`bench.Progress` of a rich progress bar."""

    def __init__(self, progress: RichProgress, total: int):
        self._progress = progress
        self._task = progress.add_task("starting", total=total)

    def begin(self, description: str) -> None:
        self._progress.update(self._task, description=description)

    def end(self) -> None:
        self._progress.advance(self._task)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _load_lines(at_start: float | None, at_end: float | None, device: torch.device, threads: int) -> list[str]:
    """Machine load around the run: other work on the same cores makes every time noisy."""
    if at_start is None or at_end is None:
        return []
    cpus = os.cpu_count() or 1
    lines = [f"machine load (1-min average): {at_start:.1f} at start, {at_end:.1f} at end; {cpus} CPUs"]
    spare = cpus - (threads if device.type == "cpu" else 1)
    if at_start > max(0.5, spare + 0.5):
        lines.append("WARNING: other work was running on this machine; times are noisy, ratios less so.")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:  # piped or logged: room for the whole table on one line per row
        console = Console(width=220)
    device = torch.device(args.device)
    if device.type not in DTYPES:
        console.print(f"unsupported --device {args.device!r}: use cpu or cuda", style="bold red")
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        console.print("--device cuda asked for, but PyTorch sees no CUDA device", style="bold red")
        return 2

    set_cpu_threads(args.threads)
    budget = QUICK_BUDGET if args.quick else DEFAULT_BUDGET
    if args.seconds is not None:
        budget = dataclasses.replace(budget, max_s=args.seconds)
    config = RunConfig(device, DTYPES[device.type], tuple(args.keep), budget, args.compiled)
    suites = [SUITES[name] for name in args.suite]

    now = datetime.datetime.now()
    header = [
        f"date: {now:%Y-%m-%d %H:%M}",
        f"device: {device_name(device)} ({device.type}), {str(config.dtype).removeprefix('torch.')}",
        f"threads: {torch.get_num_threads()}",
        f"torch {torch.__version__}, spa_kernels {spa_kernels.__version__}, "
        f"backends usable here: {', '.join(spa_kernels.backends(device))}",
        f"timing: {budget.describe()}, contenders interleaved; p20–p80 in brackets"
        + (" [--quick: a smoke test, not for quoting]" if args.quick else ""),
    ]

    load_at_start = _load_average()
    started = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with RichProgress(*columns, console=console, transient=True) as progress:
            bar = ProgressBar(progress, sum(suite.count_cases(config) for suite in suites))
            reports = [suite.run(config, bar) for suite in suites]
    except ContenderMismatch as mismatch:
        console.print(f"ABORTED: {mismatch}", style="bold red", highlight=False)
        console.print("A contender computes the wrong result, so nothing was timed for it.", style="red")
        return 1
    header.append(f"wall time of this run: {time.perf_counter() - started:.0f} s")
    header += _load_lines(load_at_start, _load_average(), device, args.threads)

    title = f"spa_kernels benchmarks — {device_name(device)}"
    print_reports(console, title, header, reports)
    if args.save:
        path = results_path(device, f"{now:%Y-%m-%d}")
        save(to_markdown(title, header, reports), path)
        console.print(f"\nsaved to {path}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
