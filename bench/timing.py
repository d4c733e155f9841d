"""Wall-clock timing: warm-up, repeated samples, median and 20th/80th percentiles.

On a GPU every sample ends with ``torch.cuda.synchronize()`` inside the timed region,
so a sample covers the kernels it launched, not just their launch.  Fast callables
are run several times per sample (``inner``) so that the timer and the
synchronisation stay small next to what is measured.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Budget:
    """How long to spend on one measurement.

    Sampling stops after ``max_runs`` samples or once ``max_s`` seconds of samples
    are taken, but never before ``min_runs`` samples.
    """

    warmup_s: float = 0.1
    min_warmup: int = 1
    min_runs: int = 5
    max_runs: int = 40
    max_s: float = 1.5
    min_sample_s: float = 1e-3

    def describe(self) -> str:
        warmup = "warm-up, then " if self.min_warmup or self.warmup_s else ""
        if self.min_runs >= self.max_runs:
            return f"{warmup}median of {self.min_runs} samples"
        return (
            f"{warmup}median of {self.min_runs}–{self.max_runs} samples "
            f"(sampling stops after ~{self.max_s:g} s per cell)"
        )


DEFAULT_BUDGET = Budget()
# Smoke tests only.  The suites run every callable once to check it right before
# timing it, which is warm-up enough for a number nobody quotes.
QUICK_BUDGET = Budget(warmup_s=0.0, min_warmup=0, min_runs=2, max_runs=2, max_s=0.0)


@dataclass(frozen=True)
class Measurement:
    """Milliseconds per call over ``runs`` samples of ``inner`` calls each."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int
    inner: int

    def __str__(self) -> str:
        return f"{format_ms(self.median_ms)} ({format_ms(self.p20_ms)}–{format_ms(self.p80_ms)})"


def format_ms(ms: float) -> str:
    """Three significant digits, no exponent: 0.123, 1.23, 12.3, 123."""
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def percentile(sorted_values: list[float], q: float) -> float:
    """Linearly interpolated percentile ``q`` (0–1) of already sorted values."""
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_cpu_threads(threads: int) -> None:
    """Intra-op threads of PyTorch and of the spa_kernels cpu backend (it follows torch)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def _run(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Seconds for ``calls`` calls of ``fn``, synchronised at both ends."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return time.perf_counter() - start


def measure(fn: Callable[[], object], device: torch.device, budget: Budget = DEFAULT_BUDGET) -> Measurement:
    """Time ``fn()`` on ``device``; see :class:`Budget` for how many samples are taken."""
    return measure_interleaved({"fn": fn}, device, budget)["fn"]


def measure_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, budget: Budget = DEFAULT_BUDGET
) -> dict[str, Measurement]:
    """Time several callables side by side: one sample of each in turn, round after round.

    Interleaving spreads every callable's samples over the same stretch of time, so
    a change in machine load moves all of them alike and their ratios stay fair.
    Each callable gets its own warm-up, samples-per-call calibration and
    :class:`Budget`; a round skips the ones already done.
    """
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a sample would be charged to whatever ran then
    try:
        inner = {name: _warm_up(fn, device, budget) for name, fn in fns.items()}
        samples: dict[str, list[float]] = {name: [] for name in fns}
        spent_s = dict.fromkeys(fns, 0.0)

        def wants_more(name: str) -> bool:
            taken = len(samples[name])
            return taken < budget.min_runs or (taken < budget.max_runs and spent_s[name] < budget.max_s)

        names = list(fns)
        round_index = 0
        while any(wants_more(name) for name in names):
            # Rotate the order so no callable always runs right after the same neighbour.
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                if wants_more(name):
                    elapsed = _run(fns[name], inner[name], device)
                    spent_s[name] += elapsed
                    samples[name].append(elapsed / inner[name] * 1e3)
            round_index += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: _summarise(values, inner[name]) for name, values in samples.items()}


def _warm_up(fn: Callable[[], object], device: torch.device, budget: Budget) -> int:
    """Run ``fn`` until warm; return the calls per sample that make a sample last ``min_sample_s``."""
    calls, seconds = 0, 0.0
    while calls < budget.min_warmup or seconds < budget.warmup_s:
        seconds += _run(fn, 1, device)
        calls += 1
    if calls == 0:  # no warm-up asked for: the caller has run fn already
        return 1
    return max(1, math.ceil(budget.min_sample_s / max(seconds / calls, 1e-9)))


def _summarise(samples_ms: list[float], inner: int) -> Measurement:
    ordered = sorted(samples_ms)
    return Measurement(
        median_ms=percentile(ordered, 0.5),
        p20_ms=percentile(ordered, 0.2),
        p80_ms=percentile(ordered, 0.8),
        runs=len(ordered),
        inner=inner,
    )
