"""Active FLOPs, the best dense anchor per row, and the GFLOP/s tables of the linear and conv suites.

Active FLOPs are the multiply-adds (×2) the pruned layer needs on its active channels
``S`` (inputs) and ``O`` (outputs), the same count for every contender: with ``P``
output positions (tokens, or ``N·H·W`` for a convolution), a ``k×k`` kernel and rank ``r``,

    forward    = 2·P·(|O|·|S|·k² + r·|S| + r·|O|)
    train step = 2·P·(2·|O|·|S|·k² + 3·r·|S| + 3·r·|O|)

The train step adds ``dx`` through the base weight and the adapter, ``dh = g·B``, ``dB``
and ``dA`` to the forward; the frozen weight gets no gradient. Bias additions and
sums are not counted. A contender that does more (``dense masked`` computes every
channel) is still credited with the active FLOPs only: its GFLOP/s is useful work per
second.
"""

from __future__ import annotations

from dataclasses import dataclass

from .report import Table, format_ratio
from .shapes import Conv2dShape, LinearShape, active_count, format_keep
from .timing import Measurement

BEST_DENSE = "best dense"

TRAIN_STEP_ATTRIBUTE = "train_step"


@dataclass(frozen=True)
class BestDense(Measurement):
    """The fastest of the dense candidates of one row, and which one it was."""

    source: str = ""

    def __str__(self) -> str:
        return f"{super().__str__()} {self.source}"


def active_flops(shape: LinearShape | Conv2dShape, keep: float, mode_attribute: str) -> float:
    """Active FLOPs of one call of ``forward`` or ``train_step`` (see the module docstring)."""
    if isinstance(shape, LinearShape):
        positions, n_in, n_out, taps = shape.tokens, shape.in_features, shape.out_features, 1
    else:  # stride 1, same padding: the output grid is the input grid
        positions = shape.batch * shape.height * shape.width
        n_in, n_out, taps = shape.in_channels, shape.out_channels, shape.kernel_size**2
    s, o, r = active_count(n_in, keep), active_count(n_out, keep), shape.rank
    if mode_attribute == TRAIN_STEP_ATTRIBUTE:
        return 2.0 * positions * (2 * o * s * taps + 3 * r * s + 3 * r * o)
    return 2.0 * positions * (o * s * taps + r * s + r * o)


def add_best_dense(times: dict[str, Measurement], candidates: tuple[str, ...]) -> None:
    """Add the :data:`BEST_DENSE` entry: the lowest median among ``candidates`` measured in ``times``."""
    measured = [(times[name], name) for name in candidates if name in times]
    if not measured:
        return
    best, name = min(measured, key=lambda entry: entry[0].median_ms)
    short = name.removeprefix("compacted ") if name != "compacted" else name  # the table is wide already
    times[BEST_DENSE] = BestDense(best.median_ms, best.p20_ms, best.p80_ms, best.runs, best.inner,
                                  source=f"[{short}]")


def gflops(flops: float, measurement: Measurement) -> float:
    return flops / (measurement.median_ms * 1e-3) / 1e9


def format_gflops(value: float) -> str:
    """Three significant digits, no exponent: 412, 41.2, 4.12, 0.412."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def throughput_table(title: str, by_keep: dict[float, dict[str, Measurement]], flops_by_keep: dict[float, float],
                     primary: str | None) -> Table:
    """GFLOP/s on the active FLOPs of every contender per keep ratio, and ``spa``'s fraction of the best dense."""
    names: list[str] = []
    for times in by_keep.values():
        names += [name for name in times if name not in names and name != BEST_DENSE]
    headers = ["keep", "active GFLOP", *names, BEST_DENSE, "spa GFLOP/s ÷ best dense"]
    rows = []
    for keep, times in sorted(by_keep.items(), reverse=True):
        flops = flops_by_keep[keep]
        cells = [format_keep(keep), f"{flops / 1e9:.3g}"]
        cells += [format_gflops(gflops(flops, times[name])) if name in times else "—" for name in names]
        best = times.get(BEST_DENSE)
        spa = times.get(primary) if primary is not None else None
        cells.append("—" if best is None else f"{format_gflops(gflops(flops, best))} {getattr(best, 'source', '')}".strip())
        cells.append("—" if best is None or spa is None else format_ratio(best.median_ms / spa.median_ms))
        rows.append(cells)
    notes = [
        "GFLOP/s on the active FLOPs (bench/throughput.py), the same count for every column; "
        f"{BEST_DENSE} = the fastest dense implementation of the compacted layer in this row (named in brackets: "
        "compacted, or the compacted variant); "
        "spa GFLOP/s ÷ best dense = spa's GFLOP/s as a fraction of it (1.0: as fast as the best dense GEMM on the "
        "compacted operands, with no compaction to pay)."
    ]
    return Table(title, headers, rows, notes)
