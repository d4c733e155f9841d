"""The linear suite: SPLoRA linear against its anchors, forward and train step, per keep ratio."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

import spa_kernels

from . import Progress, RunConfig
from .anchors import (
    COMPACTED,
    DENSE_LORA,
    DENSE_MASKED,
    SP_ADAPTERS,
    LinearProblem,
    check_contender,
    expected_result,
    linear_contenders,
    spa_kernels_contender,
    spa_kernels_name,
)
from .report import SuiteReport, Table, TargetResult, format_ratio
from .shapes import LINEAR_SHAPES, VIT_B_MLP, LinearShape, format_keep
from .timing import Measurement, measure_interleaved

MODES = {"forward": "forward", "train step": "train_step"}  # table name -> Contender attribute

# The backend the "spa" ratios are about: the fastest one present.
PRIMARY_ORDER = ("cuda", "triton", "cpu", "reference")

BACKEND_DESCRIPTIONS = {
    "cpu": "fused C++ kernels (csrc/cpu)",
    "cuda": "fused CUDA kernels (csrc/cuda)",
    "triton": "fused Triton kernels",
    "reference": "plain PyTorch reference backend (index_select + GEMMs + index_copy), the test oracle",
}

SPA = "spa"  # stands for the primary spa_kernels contender in ratio definitions


@dataclass(frozen=True)
class Ratio:
    header: str
    numerator: str
    denominator: str


RATIOS = (
    Ratio("spa ÷ compacted", SPA, COMPACTED),
    Ratio("dense masked ÷ spa", DENSE_MASKED, SPA),
    Ratio("sp_adapters ÷ spa", SP_ADAPTERS, SPA),
    Ratio("spa ÷ dense+LoRA", SPA, DENSE_LORA),
)


@dataclass(frozen=True)
class Target:
    mode: str
    keep: float
    ratio: str  # a Ratio header
    comparison: str
    limit: float


# CPU targets on the standard shape (fp32, 2 threads).
CPU_TARGETS = (
    Target("forward", 0.5, "spa ÷ compacted", "≤", 1.10),
    Target("forward", 0.5, "dense masked ÷ spa", "≥", 3.5),
    Target("train step", 0.5, "dense masked ÷ spa", "≥", 3.0),
    Target("train step", 0.5, "spa ÷ compacted", "≤", 1.2),
    Target("forward", 0.1, "dense masked ÷ spa", "≥", 25.0),
    Target("forward", 1.0, "spa ÷ dense+LoRA", "≤", 1.25),
)

Results = dict[str, dict[float, dict[str, Measurement]]]  # mode -> keep -> contender -> time


def timed_backends(device: torch.device) -> list[str]:
    """spa_kernels backends to time on ``device``, the primary one first.

    Triton on the CPU runs only in its interpreter, which is a correctness tool,
    so it is not timed there.
    """
    if device.type == "cuda":  # a contender even while auto selection does not pick it yet
        from spa_kernels.backends import cuda as cuda_backend

        cuda_backend.register()
    usable = spa_kernels.backends(device)
    if device.type == "cpu":
        usable = [name for name in usable if name != "triton"]
    return [name for name in PRIMARY_ORDER if name in usable]


def ratio_value(ratio: Ratio, times: dict[str, Measurement], primary: str) -> float | None:
    numerator = times.get(primary if ratio.numerator == SPA else ratio.numerator)
    denominator = times.get(primary if ratio.denominator == SPA else ratio.denominator)
    if numerator is None or denominator is None:
        return None
    return numerator.median_ms / denominator.median_ms


class LinearSuite:
    name = "linear"

    def shapes(self, config: RunConfig) -> tuple[LinearShape, ...]:
        return LINEAR_SHAPES[config.device.type]

    def count_cases(self, config: RunConfig) -> int:
        # Per keep ratio: one check of every contender, then one interleaved group per mode.
        return len(self.shapes(config)) * len(config.keeps) * (1 + len(MODES))

    def run(self, config: RunConfig, progress: Progress) -> SuiteReport:
        backends = timed_backends(config.device)
        primary = spa_kernels_name(backends[0])
        report = SuiteReport(self.name, notes=self._backend_notes(config.device, backends))
        for shape in self.shapes(config):
            results = self._measure_shape(shape, config, backends, progress)
            for mode in MODES:
                report.tables.append(self._table(shape, mode, results[mode], config, primary))
            if config.device.type == "cpu" and shape == VIT_B_MLP:
                report.targets += self._targets(results, primary)
                if primary != spa_kernels_name("cpu"):
                    report.targets_note = (
                        f"WARNING: evaluated on {primary} because the cpu backend is not built; "
                        "these say nothing about the fused kernels."
                    )
        if config.device.type != "cpu":
            report.notes.append("The performance targets are CPU targets; they are not evaluated on this device.")
        return report

    # ----------------------------------------------------------------- measuring

    def _measure_shape(self, shape: LinearShape, config: RunConfig, backends: list[str],
                       progress: Progress) -> Results:
        results: Results = {mode: {} for mode in MODES}
        # On GPUs the public function's index checks synchronise the host on every
        # call; time the entry point the nn modules use instead (checked below
        # through the public function all the same).
        trusted = config.device.type != "cpu"
        for keep in config.keeps:
            label = f"linear {shape.name} keep {format_keep(keep)}"
            progress.begin(f"{label}: checking every contender")
            problem = LinearProblem.make(shape, keep, config.device, config.dtype)
            expected = expected_result(problem)
            if trusted:
                for backend in backends:
                    check_contender(spa_kernels_contender(problem, backend), problem, expected)
            contenders = linear_contenders(problem, backends, trusted_indices=trusted)
            for contender in contenders:
                check_contender(contender, problem, expected)
            del expected
            progress.end()
            for mode, attribute in MODES.items():
                progress.begin(f"{label}: {mode}, {len(contenders)} contenders interleaved")
                fns = {contender.name: getattr(contender, attribute) for contender in contenders}
                results[mode][keep] = measure_interleaved(fns, config.device, config.budget)
                progress.end()
        return results

    # ----------------------------------------------------------------- reporting

    @staticmethod
    def _backend_notes(device: torch.device, backends: list[str]) -> list[str]:
        notes = []
        if device.type == "cpu" and "cpu" not in backends:
            reason = spa_kernels.cpu.BUILD_ERROR or "not registered"
            notes.append(
                "WARNING: the spa_kernels cpu backend is NOT BUILT "
                f"({reason}); the spa columns show the reference backend. Run `make build`."
            )
        for name in backends:
            description = BACKEND_DESCRIPTIONS.get(name, name)
            if name == "cpu":
                description += f", ISA {spa_kernels.cpu.isa()}"
            notes.append(f"{spa_kernels_name(name)}: {description}.")
        notes.append(f"spa (in ratios) = {spa_kernels_name(backends[0])}.")
        if device.type != "cpu":
            notes.append(
                "spa_kernels columns time the entry point of the nn modules (index lists trusted); "
                "the public function's index checks would add a host synchronisation per call."
            )
        return notes

    @staticmethod
    def _table(shape: LinearShape, mode: str, by_keep: dict[float, dict[str, Measurement]],
               config: RunConfig, primary: str) -> Table:
        names: list[str] = []
        for times in by_keep.values():
            names += [name for name in times if name not in names]
        headers = ["keep", *names, *(ratio.header for ratio in RATIOS)]
        rows = []
        for keep, times in sorted(by_keep.items(), reverse=True):
            cells = [format_keep(keep)]
            cells += [str(times[name]) if name in times else "—" for name in names]
            for ratio in RATIOS:
                value = ratio_value(ratio, times, primary)
                cells.append("—" if value is None else format_ratio(value))
            rows.append(cells)
        dtype = str(config.dtype).removeprefix("torch.")
        title = f"linear {shape} ({dtype}) — {mode}: median ms (p20–p80)"
        notes = []
        if mode == "train step":
            notes.append("train step = forward + gradients of x, A, B, bias for loss = (y · g).sum(); W frozen.")
        return Table(title, headers, rows, notes)

    @staticmethod
    def _targets(results: Results, primary: str) -> list[TargetResult]:
        by_header = {ratio.header: ratio for ratio in RATIOS}
        evaluated = []
        for target in CPU_TARGETS:
            times = results[target.mode].get(target.keep)
            value = None if times is None else ratio_value(by_header[target.ratio], times, primary)
            ratio = re.sub(rf"\b{SPA}\b", primary, target.ratio)
            evaluated.append(TargetResult(target.mode, target.keep, ratio, target.comparison, target.limit, value))
        return evaluated


SUITE = LinearSuite()
