"""The conv suite: SPLoRA conv2d against its anchors, forward and train step, per keep ratio."""

from __future__ import annotations

import re

import torch

from . import Progress, RunConfig, cpu_backend
from .anchors import COMPACTED, DENSE_MASKED, SP_ADAPTERS, check_contender, spa_kernels_name
from .conv_anchors import (
    DENSE_CONV_LORA,
    ConvProblem,
    conv_contenders,
    conv_op_backends,
    expected_conv_result,
    spa_kernels_conv_contender,
)
from .dense_limit import CHANNELS_LAST_CONV, NO_ONEDNN_CONV, conv_dense_contenders, conv_dense_notes
from .linear import BACKEND_DESCRIPTIONS, MODES, SPA, Ratio, Results, Target, ratio_value, timed_backends
from .report import SuiteReport, Table, TargetResult, format_ratio
from .shapes import CONV2D_SHAPES, RESNET_CONV3X3, Conv2dShape, format_keep
from .throughput import BEST_DENSE, active_flops, add_best_dense, throughput_table
from .timing import Measurement, measure_interleaved

RATIOS = (
    Ratio("spa ÷ compacted", SPA, COMPACTED),
    Ratio("dense masked ÷ spa", DENSE_MASKED, SPA),
    Ratio("sp_adapters ÷ spa", SP_ADAPTERS, SPA),
    Ratio("spa ÷ dense+LoRA", SPA, DENSE_CONV_LORA),
    Ratio("spa GFLOP/s ÷ best dense", BEST_DENSE, SPA),
)

# The dense implementations of the compacted layer that compete for "best dense".
DENSE_CANDIDATES = (COMPACTED, CHANNELS_LAST_CONV, NO_ONEDNN_CONV)

# CPU targets on the standard conv2d shape (fp32, 2 threads).
CPU_TARGETS = (
    Target("forward", 0.5, "dense masked ÷ spa", "≥", 3.0),
    Target("forward", 0.5, "spa ÷ compacted", "≤", 1.3),
    Target("train step", 0.5, "dense masked ÷ spa", "≥", 2.5),
)


def results_table(title: str, by_keep: dict[float, dict[str, Measurement]], ratios: tuple[Ratio, ...],
                  primary: str | None, notes: list[str]) -> Table:
    """One row per keep ratio (largest first): every contender's time, then the ratios."""
    names: list[str] = []
    for times in by_keep.values():
        names += [name for name in times if name not in names]
    headers = ["keep", *names, *(ratio.header for ratio in ratios)]
    rows = []
    for keep, times in sorted(by_keep.items(), reverse=True):
        cells = [format_keep(keep)]
        cells += [str(times[name]) if name in times else "—" for name in names]
        for ratio in ratios:
            value = None if primary is None else ratio_value(ratio, times, primary)
            cells.append("—" if value is None else format_ratio(value))
        rows.append(cells)
    return Table(title, headers, rows, notes)


def evaluate_targets(targets: tuple[Target, ...], ratios: tuple[Ratio, ...], results: Results,
                     primary: str | None) -> list[TargetResult]:
    by_header = {ratio.header: ratio for ratio in ratios}
    evaluated = []
    for target in targets:
        times = results[target.mode].get(target.keep)
        value = None
        if times is not None and primary is not None:
            value = ratio_value(by_header[target.ratio], times, primary)
        ratio = re.sub(rf"\b{SPA}\b", primary or "spa_kernels", target.ratio)
        evaluated.append(TargetResult(target.mode, target.keep, ratio, target.comparison, target.limit, value))
    return evaluated


def backend_notes(device: torch.device, backends: list[str], op: str) -> list[str]:
    """Which spa_kernels backends the suite times, and a red line when the fused cpu one is missing."""
    notes = []
    if device.type == "cpu" and "cpu" not in backends:
        if not cpu_backend.built():
            reason = f"the cpu backend is NOT BUILT ({cpu_backend.build_error()}); run `make build`"
        else:
            reason = f"the cpu backend does not implement {op} (rebuild with `make build`?)"
        notes.append(f"WARNING: {reason}; no fused kernel is timed for {op}.")
    for name in backends:
        description = BACKEND_DESCRIPTIONS.get(name, name)
        if name == "cpu":
            description += f", ISA {cpu_backend.isa()}"
        notes.append(f"{op}: {spa_kernels_name(name)}: {description}.")
    if backends:
        notes.append(f"{op}: spa (in ratios) = {spa_kernels_name(backends[0])}.")
    return notes


class ConvSuite:
    name = "conv"

    def shapes(self, config: RunConfig) -> tuple[Conv2dShape, ...]:
        return CONV2D_SHAPES[config.device.type]

    def count_cases(self, config: RunConfig) -> int:
        return len(self.shapes(config)) * len(config.keeps) * (1 + len(MODES))

    def run(self, config: RunConfig, progress: Progress) -> SuiteReport:
        backends, missing = conv_op_backends(config.device, config.dtype, timed_backends(config.device))
        primary = spa_kernels_name(backends[0]) if backends else None
        report = SuiteReport(self.name, notes=backend_notes(config.device, backends, "splora_conv2d"))
        if missing:
            report.notes.append(f"WARNING: no spa_kernels column in the conv tables: {missing}.")
        for shape in self.shapes(config):
            results = self._measure_shape(shape, config, backends, progress)
            report.notes += conv_dense_notes(ConvProblem.make(shape, 1.0, config.device, config.dtype))
            dtype = str(config.dtype).removeprefix("torch.")
            for mode, attribute in MODES.items():
                notes = []
                if mode == "train step":
                    notes.append("train step = forward + gradients of x, A, B, bias for loss = (y · g).sum(); "
                                 "W frozen.")
                title = f"conv2d {shape} ({dtype}) — {mode}: median ms (p20–p80)"
                report.tables.append(results_table(title, results[mode], RATIOS, primary, notes))
                flops = {keep: active_flops(shape, keep, attribute) for keep in results[mode]}
                title = f"conv2d {shape} ({dtype}) — {mode}: GFLOP/s on the active FLOPs"
                report.tables.append(throughput_table(title, results[mode], flops, primary))
            if config.device.type == "cpu" and shape == RESNET_CONV3X3:
                report.targets += evaluate_targets(CPU_TARGETS, RATIOS, results, primary)
                if primary is None:
                    report.targets_note = "WARNING: no spa_kernels backend runs splora_conv2d here."
                elif primary != spa_kernels_name("cpu"):
                    report.targets_note = (
                        f"WARNING: evaluated on {primary} because the cpu backend has no conv kernel; "
                        "these say nothing about the fused kernels."
                    )
        if config.device.type != "cpu":
            report.notes.append(
                "splora_conv2d: spa_kernels columns time the entry point of the nn modules (index lists trusted); "
                "the public function's index checks would add a host synchronisation per call."
            )
            report.notes.append("The conv performance targets are CPU targets; they are not evaluated here.")
        return report

    @staticmethod
    def _measure_shape(shape: Conv2dShape, config: RunConfig, backends: list[str], progress: Progress) -> Results:
        results: Results = {mode: {} for mode in MODES}
        # On GPUs the public function's index checks synchronise the host on every
        # call; time the entry point the nn modules use instead (checked below
        # through the public function all the same).
        trusted = config.device.type != "cpu"
        for keep in config.keeps:
            label = f"conv {shape.name} keep {format_keep(keep)}"
            progress.begin(f"{label}: checking every contender")
            problem = ConvProblem.make(shape, keep, config.device, config.dtype)
            expected = expected_conv_result(problem)
            if trusted:
                for backend in backends:
                    check_contender(spa_kernels_conv_contender(problem, backend), problem, expected)
            contenders = conv_contenders(problem, backends, trusted_indices=trusted) + conv_dense_contenders(problem)
            for contender in contenders:
                check_contender(contender, problem, expected)
            del expected
            progress.end()
            for mode, attribute in MODES.items():
                progress.begin(f"{label}: {mode}, {len(contenders)} contenders interleaved")
                fns = {contender.name: getattr(contender, attribute) for contender in contenders}
                results[mode][keep] = measure_interleaved(fns, config.device, config.budget)
                add_best_dense(results[mode][keep], DENSE_CANDIDATES)
                progress.end()
        return results


SUITE = ConvSuite()
