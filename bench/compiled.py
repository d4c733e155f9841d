"""Compiled against eager: one training step of a pruned SPA model under ``torch.compile`` and as it is.

The network suites (``resnet50``, ``transformer``) add one such row for a model at
density 0.5.  Compiling costs minutes on a few CPU cores, so the row is optional:
:class:`CompileGate` runs it when ``--compiled yes`` asks for it, or, under the default
``--compiled auto``, only while the suite is within its time budget.

The compiled model is a deep copy of the eager one, so both start from the same
weights; the first step of each (compilation included, never timed) returns logits
that must agree before anything is timed.  A second step warms both up, then they
are sampled in turn like every other contender.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .anchors import ContenderMismatch, tolerance
from .conv import results_table
from .linear import Ratio
from .report import SuiteReport, Table, TargetResult
from .timing import Budget, measure_interleaved

EAGER = "eager"
COMPILED = "torch.compile"
RATIO = Ratio("compiled ÷ eager", COMPILED, EAGER)
TARGET = 1.0  # compiled ÷ eager, train step at density 0.5
COMPILE_MODES = ("auto", "yes", "no")

StepFactory = Callable[[nn.Module], Callable[[], Tensor]]
"""Builds a train step of a model: each call runs one step and returns its (detached) logits."""


@dataclass
class CompileGate:
    """Whether a suite still has time for its compiled row (``mode`` is ``--compiled``)."""

    mode: str
    budget_s: float  # what the whole suite should take
    reserve_s: float  # what compiling and timing the row takes, roughly, on 2 quiet CPU cores
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        if self.mode not in COMPILE_MODES:
            raise ValueError(f"compiled mode must be one of {COMPILE_MODES}, got {self.mode!r}")

    def skip_reason(self) -> str | None:
        """None when the row should run, else why it does not."""
        if self.mode == "yes":
            return None
        if self.mode == "no":
            return "--compiled no"
        elapsed = time.perf_counter() - self.started
        if elapsed + self.reserve_s > self.budget_s:
            return (f"the suite had used {elapsed:.0f} s of its {self.budget_s:.0f} s budget and the row needs "
                    f"about {self.reserve_s:.0f} s more; `--compiled yes` runs it anyway")
        return None


def compiled_vs_eager(title: str, model: nn.Module, step_for: StepFactory, device: torch.device,
                      dtype: torch.dtype, budget: Budget, keep: float,
                      target_label: str) -> tuple[Table | None, TargetResult, list[str]]:
    """Time ``step_for(model)`` against the same step of ``torch.compile`` on a copy of ``model``.

    Returns the table (None when compiling failed), the target ``compiled ÷ eager ≤ 1``
    (unmeasured when compiling failed) and notes (compile time, or why it failed).
    A compiled model whose logits differ from the eager one's raises ContenderMismatch.
    """
    target = TargetResult("train step", keep, f"compiled ÷ eager ({target_label})", "≤", TARGET, None)
    eager_step = step_for(model)
    compiled_step = step_for(torch.compile(copy.deepcopy(model)))
    want = eager_step()
    started = time.perf_counter()
    try:
        got = compiled_step()
        compiled_step()  # the backward of the first step may trigger more compilation
    except Exception as error:  # noqa: BLE001  (any compiler failure is a result to report, not a crash)
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return None, target, [f"WARNING: {target_label}: torch.compile failed ({type(error).__name__}: "
                              f"{message[:200]}); no compiled row."]
    compile_s = time.perf_counter() - started
    eager_step()
    error = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    limit = 10 * tolerance(dtype)
    if not error <= limit * max(scale, 1e-30):
        raise ContenderMismatch(f"{target_label}: torch.compile logits differ from eager by {error:.3g} "
                                f"(largest value {scale:.3g}, allowed {limit:g} of it)")
    times = measure_interleaved({EAGER: eager_step, COMPILED: compiled_step}, device, budget)
    target.value = times[COMPILED].median_ms / times[EAGER].median_ms
    notes = [f"torch.compile (default mode) on a copy of the eager model; compiling and the first two steps took "
             f"{compile_s:.0f} s, not timed. Logits of the first step agree with eager."]
    return results_table(title, {keep: times}, (RATIO,), EAGER, notes), target, []


def add_compiled_row(report: SuiteReport, gate: CompileGate, suite: str,
                     row: Callable[[], tuple[Table | None, TargetResult, list[str]]], targets_apply: bool) -> None:
    """Run ``row`` (a :func:`compiled_vs_eager` call) unless ``gate`` skips it, and add what it gives to ``report``.

    The table when there is one and the notes always; the target only when
    ``targets_apply`` (the suites set CPU targets).  A skipped row leaves a note saying why.
    """
    skip = gate.skip_reason()
    if skip is not None:
        report.notes.append(f"{suite}: the torch.compile vs eager row was skipped ({skip}).")
        return
    table, target, notes = row()
    if table is not None:
        report.tables.append(table)
    report.notes += notes
    if targets_apply:
        report.targets.append(target)
