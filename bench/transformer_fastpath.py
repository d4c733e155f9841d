"""The transformer-inference suite: what leaving PyTorch's encoder fast path costs.

In inference (eval, ``no_grad``) ``nn.TransformerEncoder`` runs each layer as one
fused native kernel that reads the layers' weights itself.  A converted encoder
must call its SPA layers instead (``spa_kernels.nn.ComposedTransformerEncoder``),
so it gives that kernel up.  Three encoders with the same weights, timed side by side
in eval mode under ``torch.no_grad``:

* ``torch fast path``: the unconverted torch encoder, PyTorch's fused kernel;
* ``torch composed``: the same encoder with the fast path switched off
  (``torch.backends.mha.set_fastpath_enabled(False)``): the layer-by-layer path;
* ``spa_kernels``: ``spa_kernels.convert(encoder, rank=16)``, the feed-forward
  hidden channels masked to the keep ratio (``linear1`` outputs, ``linear2`` inputs),
  attention left unconverted.

``torch composed ÷ torch fast path`` is what the fast path is worth on its own;
``spa ÷ torch fast path`` is what a converted model pays or gains against the
unadapted base.  Before timing, the two torch paths must agree, and the converted
encoder's inference output must equal its own training-mode output.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

import spa_kernels

from . import Progress, RunConfig
from .anchors import ContenderMismatch, tolerance
from .report import SuiteReport, Table, format_ratio
from .shapes import DATA_SEED, MASK_SEED, format_keep
from .timing import QUICK_BUDGET, Measurement, measure_interleaved

FAST_PATH = "torch fast path"
COMPOSED = "torch composed"
SPA = "spa_kernels"


@dataclass(frozen=True)
class EncoderShape:
    name: str
    d_model: int
    heads: int
    feedforward: int
    layers: int
    batch: int
    tokens: int
    rank: int = 16


VIT_B_ENCODER = EncoderShape("vit-b encoder, 2 layers", 768, 12, 3072, layers=2, batch=2, tokens=197)
SMOKE_ENCODER = EncoderShape("small encoder (smoke)", 64, 4, 256, layers=2, batch=2, tokens=17, rank=4)


def _shape_for(config: RunConfig) -> EncoderShape:
    return SMOKE_ENCODER if config.budget == QUICK_BUDGET else VIT_B_ENCODER


@contextlib.contextmanager
def _fast_path(enabled: bool):
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _encoders(shape: EncoderShape, keep: float, config: RunConfig) -> tuple[nn.Module, nn.Module]:
    """The torch encoder and its converted, masked copy, in eval mode."""
    torch.manual_seed(DATA_SEED)
    layer = nn.TransformerEncoderLayer(shape.d_model, shape.heads, shape.feedforward, dropout=0.0, batch_first=True)
    base = nn.TransformerEncoder(layer, shape.layers, enable_nested_tensor=False)
    base = base.to(config.device, config.dtype).eval()
    spa_logger = logging.getLogger("spa_kernels")
    level = spa_logger.level
    spa_logger.setLevel(logging.ERROR)  # the attention modules are left unconverted on purpose
    try:
        converted = spa_kernels.convert(base, rank=shape.rank).eval()
    finally:
        spa_logger.setLevel(level)
    generator = torch.Generator().manual_seed(MASK_SEED)
    active = max(1, round(keep * shape.feedforward))
    for encoder_layer in converted.layers:
        hidden = torch.zeros(shape.feedforward, dtype=torch.bool)
        hidden[torch.randperm(shape.feedforward, generator=generator)[:active]] = True
        encoder_layer.linear1.set_masks(out_mask=hidden)
        encoder_layer.linear2.set_masks(in_mask=hidden)
        with torch.no_grad():
            cols = encoder_layer.linear1.adapter.cols
            cols.copy_(0.02 * torch.randn(cols.shape, generator=generator).to(cols))
    return base, converted


def _agree(result: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> bool:
    error = (result.float() - reference.float()).abs().max()
    return bool(error <= tolerance(dtype) * reference.float().abs().max())


def _check(base: nn.Module, converted: nn.Module, x: torch.Tensor, config: RunConfig, keep: float) -> None:
    with torch.no_grad():
        with _fast_path(True):
            fast = base(x)
        with _fast_path(False):
            composed = base(x)
        adapted = converted(x)
    if not _agree(fast, composed, config.dtype):
        raise ContenderMismatch(f"fastpath keep {format_keep(keep)}: torch's fast and composed paths differ")
    converted.train()
    try:
        expected = converted(x).detach()
    finally:
        converted.eval()
    if not _agree(adapted, expected, config.dtype):
        raise ContenderMismatch(f"fastpath keep {format_keep(keep)}: {SPA} in inference differs from training mode")


def _timed(base: nn.Module, converted: nn.Module, x: torch.Tensor, config: RunConfig) -> dict[str, Measurement]:
    def run(model: nn.Module, fast_path: bool):
        def call() -> None:
            with torch.no_grad(), _fast_path(fast_path):
                model(x)
        return call

    return measure_interleaved(
        {FAST_PATH: run(base, True), COMPOSED: run(base, False), SPA: run(converted, True)},
        config.device, config.budget,
    )


class TransformerFastPathSuite:
    name = "fastpath"

    def count_cases(self, config: RunConfig) -> int:
        return len(config.keeps)

    def run(self, config: RunConfig, progress: Progress) -> SuiteReport:
        shape = _shape_for(config)
        generator = torch.Generator().manual_seed(DATA_SEED)
        x = torch.randn(shape.batch, shape.tokens, shape.d_model, generator=generator).to(config.device, config.dtype)
        rows = []
        for keep in config.keeps:
            progress.begin(f"fastpath {shape.name} keep {format_keep(keep)}")
            base, converted = _encoders(shape, keep, config)
            _check(base, converted, x, config, keep)
            times = _timed(base, converted, x, config)
            fast = times[FAST_PATH].median_ms
            rows.append([
                format_keep(keep), str(times[FAST_PATH]), str(times[COMPOSED]), str(times[SPA]),
                format_ratio(times[COMPOSED].median_ms / fast), format_ratio(times[SPA].median_ms / fast),
            ])
            progress.end()
        table = Table(
            title=f"Encoder inference (eval, no_grad): {shape.name}, d={shape.d_model}, heads={shape.heads}, "
                  f"ff={shape.feedforward}, batch {shape.batch} × {shape.tokens} tokens, rank {shape.rank}",
            headers=["keep (ff hidden)", FAST_PATH, COMPOSED, SPA, f"{COMPOSED} ÷ fast path", "spa ÷ fast path"],
            rows=rows,
            notes=[
                "The converted encoder cannot use PyTorch's fused encoder-layer kernel, which would skip "
                "its adapters; the composed column is the same loss for the plain model.",
                "Attention is not converted, so it keeps its own native kernel in every column.",
            ],
        )
        return SuiteReport(self.name, tables=[table])


SUITE = TransformerFastPathSuite()
