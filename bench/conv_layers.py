"""The conv-layers suite: the cpu conv kernels on the convolutions of ResNet-50's first two stages.

One row per layer shape and keep ratio, forward and train step, three contenders
timed side by side:

* ``spa_kernels[cpu]``: ``splora_conv2d`` on the cpu backend; below keep 1.0 with
  ``compact_input`` and ``compact_output``, so it reads and writes the same compact
  tensors as the dense contenders and the difference is the kernels alone;
* ``compacted``: oneDNN through ``F.conv2d`` on the compacted NCHW tensors (the
  adapter as a parallel strided 1×1 convolution);
* ``compacted channels-last``: the same on channels-last tensors.

The train step is the gradients of ``x``, ``A``, ``B`` and the bias (``W`` frozen),
as in the conv suite. Every contender is checked against the compacted one first.
Shapes: ImageNet 224² geometry (stage 1 at 56×56, stage 2 at 28×28), batch 8, rank 8.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import spa_kernels

from . import Progress, RunConfig, cpu_backend
from .anchors import ContenderMismatch, _leaf
from .linear import MODES
from .report import SuiteReport, Table, format_ratio
from .shapes import DATA_SEED, active_count, channel_indices, format_keep
from .throughput import format_gflops
from .timing import Budget, Measurement, measure_interleaved

SPA_CPU = "spa_kernels[cpu]"
COMPACTED = "compacted"
CHANNELS_LAST = "compacted channels-last"
KEEPS = (1.0, 0.5)
BATCH = 8
RANK = 8
# About 1.5 minutes for the whole suite on 2 loaded cores.
LAYER_BUDGET = Budget(warmup_s=0.05, min_warmup=1, min_runs=5, max_runs=15, max_s=0.3)


@dataclass(frozen=True)
class LayerShape:
    """One convolution of ResNet-50 (Hugging Face layout: the stride sits on the 3×3 and the shortcut)."""

    name: str
    in_channels: int
    out_channels: int
    size: int  # input height = width
    kernel_size: int
    stride: int = 1

    @property
    def padding(self) -> int:
        return self.kernel_size // 2

    @property
    def out_size(self) -> int:
        return (self.size + 2 * self.padding - self.kernel_size) // self.stride + 1

    def __str__(self) -> str:
        stride = f" /{self.stride}" if self.stride > 1 else ""
        return (f"{self.name}: {self.in_channels}→{self.out_channels} {self.kernel_size}×{self.kernel_size}{stride} "
                f"@{self.size}")


LAYERS = (
    LayerShape("s1 reduce (first)", 64, 64, 56, 1),
    LayerShape("s1 3×3", 64, 64, 56, 3),
    LayerShape("s1 expand", 64, 256, 56, 1),
    LayerShape("s1 reduce", 256, 64, 56, 1),
    LayerShape("s2 3×3 down", 128, 128, 56, 3, stride=2),
    LayerShape("s2 shortcut down", 256, 512, 56, 1, stride=2),
    LayerShape("s2 3×3", 128, 128, 28, 3),
    LayerShape("s2 expand", 128, 512, 28, 1),
    LayerShape("s2 reduce", 512, 128, 28, 1),
)


def layer_flops(shape: LayerShape, keep: float, mode_attribute: str) -> float:
    """Active FLOPs as bench/throughput.py counts them, on the strided output grid."""
    positions = BATCH * shape.out_size**2
    s, o, r = active_count(shape.in_channels, keep), active_count(shape.out_channels, keep), RANK
    taps = shape.kernel_size**2
    if mode_attribute == "train_step":
        return 2.0 * positions * (2 * o * s * taps + 3 * r * s + 3 * r * o)
    return 2.0 * positions * (o * s * taps + r * s + r * o)


@dataclass
class LayerContender:
    name: str
    forward: Callable[[], Tensor]
    train_step: Callable[[], tuple[Tensor, ...]]
    active: Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]] = lambda results: results
    """Maps (y, dx, dA, dB, dbias) to their active blocks, for the check."""


def layer_contenders(shape: LayerShape, keep: float) -> list[LayerContender]:
    """spa cpu (compact tensors below keep 1.0) and the two oneDNN layouts, on the same values."""
    generator = torch.Generator().manual_seed(DATA_SEED)
    c_in, c_out, k = shape.in_channels, shape.out_channels, shape.kernel_size
    x = torch.randn(BATCH, c_in, shape.size, shape.size, generator=generator)
    weight = torch.randn(c_out, c_in, k, k, generator=generator) * (c_in * k * k) ** -0.5
    lora_a = torch.randn(RANK, c_in, generator=generator) * c_in**-0.5
    lora_b = torch.randn(c_out, RANK, generator=generator) * RANK**-0.5
    bias = torch.randn(c_out, generator=generator) * 0.1
    in_idx, out_idx = channel_indices(c_in, c_out, keep)
    grad_out_o = torch.randn(BATCH, out_idx.numel(), shape.out_size, shape.out_size, generator=generator)
    compact = keep < 1.0
    x_s = x[:, in_idx].contiguous()
    weight_os = weight[out_idx][:, in_idx].contiguous()
    stride, padding = shape.stride, shape.padding

    def spa() -> LayerContender:
        xs, a, b, bias_ = _leaf(x_s if compact else x), _leaf(lora_a), _leaf(lora_b), _leaf(bias)

        def layer() -> Tensor:
            return spa_kernels.splora_conv2d(xs, weight, a, b, bias_, in_idx, out_idx, stride=stride,
                                             padding=padding, backend="cpu", compact_input=compact,
                                             compact_output=compact)
        contender = _wrap(SPA_CPU, layer, (xs, a, b, bias_), grad_out_o)
        # The adapter and bias gradients are full width (zero where pruned).
        contender.active = lambda r: (*r[:2], r[2][:, in_idx], r[3][out_idx], r[4][out_idx])
        return contender

    def onednn(name: str, memory_format: torch.memory_format) -> LayerContender:
        xs = x_s.contiguous(memory_format=memory_format).requires_grad_(True)
        w = weight_os.contiguous(memory_format=memory_format)
        a = _leaf(lora_a[:, in_idx])
        b = _leaf(lora_b[out_idx])
        bias_o = _leaf(bias[out_idx])
        g = grad_out_o.contiguous(memory_format=memory_format)

        def layer() -> Tensor:
            y = F.conv2d(xs, w, bias_o, stride=stride, padding=padding)
            # Same padding: the centre taps are x itself, read with the stride.
            low = F.conv2d(xs, a[:, :, None, None], stride=stride)
            return y + F.conv2d(low, b[:, :, None, None])
        return _wrap(name, layer, (xs, a, b, bias_o), g)

    return [spa(), onednn(COMPACTED, torch.contiguous_format), onednn(CHANNELS_LAST, torch.channels_last)]


def _wrap(name: str, layer: Callable[[], Tensor], inputs: tuple[Tensor, ...], grad_out: Tensor) -> LayerContender:
    def forward() -> Tensor:
        with torch.no_grad():
            return layer()

    def train_step() -> tuple[Tensor, ...]:
        return torch.autograd.grad(layer(), inputs, grad_out)

    return LayerContender(name, forward, train_step)


def check_against_compacted(contenders: list[LayerContender], label: str) -> None:
    """Every contender's output and gradients against the compacted oneDNN one (fp32 tolerances)."""
    want = (contenders[1].forward(), *contenders[1].train_step())
    for contender in contenders:
        got = contender.active((contender.forward(), *contender.train_step()))
        for what, g, w in zip(("y", "dx", "dA", "dB", "dbias"), got, want, strict=True):
            if g.shape != w.shape or not torch.allclose(g, w, rtol=1e-3, atol=1e-3):
                raise ContenderMismatch(f"{contender.name} ({label}): {what} disagrees with {COMPACTED}")


class ConvLayersSuite:
    name = "conv-layers"

    def count_cases(self, config: RunConfig) -> int:
        return len(LAYERS) * len(self._keeps(config)) * len(MODES) if config.device.type == "cpu" else 0

    @staticmethod
    def _keeps(config: RunConfig) -> tuple[float, ...]:
        return tuple(keep for keep in KEEPS if keep in config.keeps) or KEEPS

    def run(self, config: RunConfig, progress: Progress) -> SuiteReport:
        report = SuiteReport(self.name)
        if config.device.type != "cpu" or not cpu_backend.built():
            report.notes.append("conv-layers: cpu only, and the cpu backend must be built; nothing timed.")
            return report
        budget = config.budget if config.budget.max_s < LAYER_BUDGET.max_s else LAYER_BUDGET
        rows: dict[str, list[list[str]]] = {mode: [] for mode in MODES}
        for shape in LAYERS:
            for keep in self._keeps(config):
                label = f"{shape.name} keep {format_keep(keep)}"
                contenders = layer_contenders(shape, keep)
                check_against_compacted(contenders, label)
                for mode, attribute in MODES.items():
                    progress.begin(f"conv-layers {label}: {mode}")
                    times = measure_interleaved({c.name: getattr(c, attribute) for c in contenders},
                                                config.device, budget)
                    rows[mode].append(_row(shape, keep, attribute, times))
                    progress.end()
        headers = ["layer", "keep", "active GFLOP", SPA_CPU, COMPACTED, CHANNELS_LAST, "spa ÷ best dense",
                   "spa GFLOP/s", "best dense GFLOP/s"]
        for mode in MODES:
            notes = [f"x {BATCH} × C × H × W, rank {RANK}; below keep 1.0 spa reads and writes compact tensors "
                     "(compact_input/compact_output), as the dense contenders do; median ms (p20–p80)."]
            if mode == "train step":
                notes.append("train step = forward + gradients of x, A, B, bias; W frozen.")
            report.tables.append(Table(f"conv layers of ResNet-50 stages 1–2 (fp32, cpu) — {mode}", headers,
                                       rows[mode], notes))
        return report


def _row(shape: LayerShape, keep: float, attribute: str, times: dict[str, Measurement]) -> list[str]:
    flops = layer_flops(shape, keep, attribute)
    best = min(times[COMPACTED].median_ms, times[CHANNELS_LAST].median_ms)
    spa = times[SPA_CPU].median_ms
    return [str(shape), format_keep(keep), f"{flops / 1e9:.3g}", str(times[SPA_CPU]), str(times[COMPACTED]),
            str(times[CHANNELS_LAST]), format_ratio(spa / best), format_gflops(flops / spa / 1e6),
            format_gflops(flops / best / 1e6)]


SUITE = ConvLayersSuite()
