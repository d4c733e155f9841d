"""The overhead suite: what one call of an SPA module costs beyond its arithmetic.

A ResNet-50 holds 53 SPA layers, so a fixed cost per call adds up even where each
kernel is fast.  This suite times layers so small that their arithmetic is
negligible (Linear 8 → 8; Conv2d 8 → 8, 3×3, padding 1, on 4×4 inputs), so the
time is the per-call cost of the Python module, the functional layer, the op
and the kernel entry:

* ``plain``: ``nn.Linear`` / ``nn.Conv2d``, every parameter trainable;
* ``SPLoRA``: ``spa_kernels.nn.SPLoRALinear`` / ``SPLoRAConv2d`` (rank 4) on the
  cpu backend, every channel active;
* ``SPLoRA pruned``: the same layer with half the input and output channels pruned.

Each row is one layer kind, batch size (1, and a training batch) and mode:
``forward`` under ``torch.no_grad()``, or ``forward+backward``: the output, then
the gradients of the input and of every trainable parameter, taken as
``torch.autograd.grad`` (the SPA weight is frozen, so its layer trains the
adapter and the bias).  The three contenders of a row are sampled in turn
(medians, interleaved) and the target is SPA ÷ plain ≤ 1.5× for both SPA layers.
Every SPA layer is first checked against its merged plain layer
(``to_module()``), forward and input gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import spa_kernels
from spa_kernels.nn import SPLoRAConv2d, SPLoRALinear

from . import Progress, RunConfig
from .anchors import ContenderMismatch
from .report import SuiteReport, Table, TargetResult, format_ratio
from .timing import Measurement, measure_interleaved

CHANNELS = 8
RANK = 4
CONV_KERNEL = 3
CONV_SIZE = 4
BATCHES = {"linear": (1, 256), "conv2d": (1, 32)}
MODES = ("forward", "forward+backward")
PRUNED_KEEP = 0.5
TARGET = 1.5
BACKEND = "cpu"
DATA_SEED = 0

PLAIN = "plain"
SPA = "SPLoRA"
SPA_PRUNED = "SPLoRA pruned"
CONTENDERS = (PLAIN, SPA, SPA_PRUNED)


@dataclass(frozen=True)
class Case:
    layer: str  # "linear" or "conv2d"
    batch: int
    mode: str

    @property
    def label(self) -> str:
        return f"{self.layer} batch {self.batch} {self.mode}"


def cases() -> list[Case]:
    return [Case(layer, batch, mode) for layer, batches in BATCHES.items() for batch in batches for mode in MODES]


def _plain_layer(layer: str) -> nn.Module:
    if layer == "linear":
        return nn.Linear(CHANNELS, CHANNELS)
    return nn.Conv2d(CHANNELS, CHANNELS, CONV_KERNEL, padding=CONV_KERNEL // 2)


def _input(case: Case, generator: torch.Generator) -> Tensor:
    shape = (case.batch, CHANNELS) if case.layer == "linear" else (case.batch, CHANNELS, CONV_SIZE, CONV_SIZE)
    return torch.randn(shape, generator=generator)


def _pruning_masks(generator: torch.Generator) -> tuple[Tensor, Tensor]:
    kept = round(CHANNELS * PRUNED_KEEP)
    masks = []
    for _ in range(2):
        mask = torch.zeros(CHANNELS, dtype=torch.bool)
        mask[torch.randperm(CHANNELS, generator=generator)[:kept]] = True
        masks.append(mask)
    return masks[0], masks[1]


def layers(case: Case, backend: str) -> dict[str, nn.Module]:
    """The three contenders' layers, SPA ones built from the plain one (same weight)."""
    torch.manual_seed(DATA_SEED)
    plain = _plain_layer(case.layer)
    spa_type = SPLoRALinear if case.layer == "linear" else SPLoRAConv2d
    spa = spa_type.from_module(plain, rank=RANK, backend=backend)
    pruned = spa_type.from_module(plain, rank=RANK, backend=backend)
    pruned.set_masks(*_pruning_masks(torch.Generator().manual_seed(DATA_SEED)))
    return {PLAIN: plain, SPA: spa, SPA_PRUNED: pruned}


def timed_call(layer: nn.Module, x: Tensor, mode: str) -> Callable[[], object]:
    if mode == "forward":
        def forward() -> Tensor:
            with torch.no_grad():
                return layer(x)
        return forward
    leaf = x.detach().clone().requires_grad_(True)
    inputs = [leaf] + [p for p in layer.parameters() if p.requires_grad]
    grad_out = torch.ones_like(layer(x.detach()))

    def forward_backward() -> tuple[Tensor, ...]:
        return torch.autograd.grad(layer(leaf), inputs, grad_out)
    return forward_backward


def check_layer(name: str, layer: nn.Module, x: Tensor) -> None:
    """An SPA layer against its merged plain layer: output and input gradient."""
    merged = layer.to_module()
    got_x, want_x = (x.detach().clone().requires_grad_(True) for _ in range(2))
    got, want = layer(got_x), merged(want_x)
    grad_out = torch.randn_like(want)
    got_grad, = torch.autograd.grad(got, got_x, grad_out)
    want_grad, = torch.autograd.grad(want, want_x, grad_out)
    for what, a, b in (("y", got, want), ("dx", got_grad, want_grad)):
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
            raise ContenderMismatch(f"overhead: {name} {what} differs from its merged plain layer")


def _ratio(times: dict[str, Measurement], name: str) -> float | None:
    if name not in times or PLAIN not in times:
        return None
    return times[name].median_ms / times[PLAIN].median_ms


class OverheadSuite:
    name = "overhead"

    def count_cases(self, config: RunConfig) -> int:
        return len(cases()) if config.device.type == "cpu" else 0

    def run(self, config: RunConfig, progress: Progress) -> SuiteReport:
        report = SuiteReport(self.name)
        if config.device.type != "cpu":
            report.notes.append("overhead: a CPU suite (cpu backend); not run on this device.")
            return report
        backend = BACKEND if BACKEND in spa_kernels.backends("cpu") else "reference"
        if backend != BACKEND:
            report.notes.append("WARNING: overhead: the cpu backend is not built; SPA layers run the reference.")
        generator = torch.Generator().manual_seed(DATA_SEED)
        rows = []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # more threads would time their wake-ups, not the call
        try:
            for case in cases():
                rows.append(self._measure(case, backend, generator, config, progress, report))
        finally:
            torch.set_num_threads(threads)
        headers = ["layer, batch, mode", *(f"{name} ms" for name in CONTENDERS),
                   f"{SPA} ÷ plain", f"{SPA_PRUNED} ÷ plain"]
        notes = [
            f"Linear {CHANNELS}→{CHANNELS}; Conv2d {CHANNELS}→{CHANNELS} {CONV_KERNEL}×{CONV_KERNEL} on "
            f"{CONV_SIZE}×{CONV_SIZE}; rank {RANK}; pruned keeps {PRUNED_KEEP:g} of the inputs and outputs; "
            f"SPA layers on backend={backend!r}.",
            "Arithmetic is negligible at these sizes: the times are per-call overhead (warm caches, "
            "one thread whatever --threads says).",
        ]
        report.tables.append(Table(f"overhead ({str(config.dtype).removeprefix('torch.')}): median ms (p20–p80)",
                                   headers, rows, notes))
        return report

    @staticmethod
    def _measure(case: Case, backend: str, generator: torch.Generator, config: RunConfig, progress: Progress,
                 report: SuiteReport) -> list[str]:
        """One row: check the SPA layers, time the three contenders interleaved, add the targets."""
        progress.begin(f"overhead {case.label}: {len(CONTENDERS)} contenders interleaved")
        x = _input(case, generator)
        contenders = layers(case, backend)
        for name in (SPA, SPA_PRUNED):
            check_layer(name, contenders[name], x)
        fns = {name: timed_call(layer, x, case.mode) for name, layer in contenders.items()}
        times = measure_interleaved(fns, config.device, config.budget)
        ratios = [_ratio(times, name) for name in (SPA, SPA_PRUNED)]
        for keep, name, ratio in ((1.0, SPA, ratios[0]), (PRUNED_KEEP, SPA_PRUNED, ratios[1])):
            report.targets.append(TargetResult(case.label, keep, f"{name} ÷ plain", "≤", TARGET, ratio))
        progress.end()
        return [case.label, *(str(times[name]) for name in CONTENDERS),
                *(format_ratio(r) if r is not None else "—" for r in ratios)]


SUITE = OverheadSuite()
