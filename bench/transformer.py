"""The transformer suite: one training step of ViT-B/16- and BERT-base-shaped encoder stacks.

Each stack is pre-norm blocks of ``nn.MultiheadAttention`` and a GELU MLP on random
token embeddings (the patch or word embedding is left out: it is not pruned), mean
pooled into a linear classifier.  At density ``p`` a fraction ``p`` of the heads of
every layer and of its MLP channels stays active.  Contenders, all with the same base
weights and adapters:

* ``spa_kernels``: ``spa_kernels.convert(model, rank)``, ``set_masks(head_mask=...)`` on
  each attention layer and the MLP channel masks on ``fc1``/``fc2``;
* ``spa compact act.``: the same after ``spa_kernels.compact_activations(model, (tokens,))``:
  the MLP's hidden activations carry only the active channels;
* ``sp_adapters``: ``sp_adapters.SPLoRA(model, rank)``; its MLP channels masked by hooks
  (mask-based pruning); its attention reads merged weights inside torch's attention
  function, where no hook reaches, so it runs every head at every density;
* ``full fine-tune``: the unconverted model, every parameter trained;
* ``dense LoRA``: frozen base plus PEFT-style low-rank adapters in plain PyTorch;
* ``compacted``: the same LoRA model physically holding only the active heads and MLP
  channels, the practical limit.

Before timing, the logits of each pruned contender are checked against the
compacted model in float64 (sp_adapters at density 1 only).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import sp_adapters
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import spa_kernels
from spa_kernels.nn import SPLoRALinear, SPLoRAMultiheadAttention

from . import Progress, RunConfig
from .anchors import COMPACTED, SP_ADAPTERS, ContenderMismatch, tolerance
from .compiled import CompileGate, add_compiled_row, compiled_vs_eager
from .conv import results_table
from .linear import Ratio
from .network import mask_with_hooks, redraw_adapters
from .report import SuiteReport, TargetResult
from .shapes import DATA_SEED, MASK_SEED, format_keep
from .timing import Measurement, measure_interleaved

SPA = "spa_kernels"
SPA_COMPACT = "spa compact act."
FULL = "full fine-tune"
DENSE_LORA = "dense LoRA"
DENSITIES = (1.0, 0.5, 0.3)
LEARNING_RATE = 1e-3
FLOAT64_TOLERANCE = 1e-8

RATIOS = (
    Ratio("sp_adapters ÷ spa", SP_ADAPTERS, SPA),
    Ratio("spa ÷ compacted", SPA, COMPACTED),
    Ratio("compact act. ÷ compacted", SPA_COMPACT, COMPACTED),
    Ratio("full ÷ spa", FULL, SPA),
)
# CPU targets on the ViT-B/16 shape: (density, ratio header, comparison, limit).
TARGET_SP_ADAPTERS = 2.2
TARGET_COMPACTED = 1.15
TARGET_DENSITY_SPEEDUP = 1.6
SUITE_BUDGET_S = 180.0  # the whole suite on 2 quiet CPU cores, roughly
COMPILE_RESERVE_S = 60.0  # compiling the ViT-B/16 stack's train step and timing it, on 2 cores, roughly


@dataclass(frozen=True)
class TransformerShape:
    name: str
    layers: int
    tokens: int
    batch: int
    width: int = 768
    heads: int = 12
    mlp: int = 3072
    rank: int = 16
    classes: int = 10

    def __str__(self) -> str:
        return (f"{self.name}: {self.layers} layers, d{self.width}, {self.heads} heads, MLP {self.mlp}, "
                f"batch {self.batch}×{self.tokens} tokens, rank {self.rank}")


VIT_B16 = TransformerShape("ViT-B/16", layers=4, tokens=197, batch=2)
BERT_BASE = TransformerShape("BERT-base", layers=4, tokens=128, batch=4)
SHAPES = (VIT_B16, BERT_BASE)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(width, mlp), nn.Linear(mlp, width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Stack(nn.Module):
    def __init__(self, blocks: list[nn.Module], norm: nn.Module, head: nn.Module):
        super().__init__()
        self.blocks, self.norm, self.head = nn.Sequential(*blocks), norm, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


def base_stack(shape: TransformerShape) -> Stack:
    blocks = [Block(shape.width, shape.heads, shape.mlp) for _ in range(shape.layers)]
    stack = Stack(blocks, nn.LayerNorm(shape.width), nn.Linear(shape.width, shape.classes))
    with torch.no_grad():  # torch initialises attention biases to zero, which would hide a lost bias
        for block in blocks:
            block.attn.in_proj_bias.normal_(std=0.1)
    return stack


class LoRALinear(nn.Module):
    """Frozen ``W`` (out × in) plus trainable ``B A`` and bias: PEFT's LoRA, in plain PyTorch."""

    def __init__(self, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.lora_a, self.lora_b = nn.Parameter(lora_a.detach().clone()), nn.Parameter(lora_b.detach().clone())
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)


def _lora(layer: SPLoRALinear, rows: Tensor | None = None, cols: Tensor | None = None,
          bias: Tensor | None = None) -> LoRALinear:
    """The block ``rows × cols`` of an SPA linear as a :class:`LoRALinear` (all of it where ``None``)."""
    weight, lora_a, lora_b = layer.weight, layer.adapter.rows[0], layer.adapter.cols[0]
    bias = layer.bias if bias is None else bias
    if rows is not None:
        weight, lora_b, bias = weight[rows], lora_b[rows], None if bias is None else bias[rows]
    if cols is not None:
        weight, lora_a = weight[:, cols], lora_a[:, cols]
    return LoRALinear(weight, bias, lora_a, lora_b, layer.scale)


class CompactAttention(nn.Module):
    """Self-attention over ``heads`` heads of width ``head_dim``, projections as LoRA linears."""

    def __init__(self, attention: SPLoRAMultiheadAttention):
        super().__init__()
        self.head_dim = attention.head_dim
        channels = torch.nonzero(attention.head_mask.repeat_interleave(self.head_dim)).flatten()
        biases = attention.in_proj_bias.chunk(3)
        self.q, self.k, self.v = (_lora(getattr(attention, name), rows=channels, bias=bias)
                                  for name, bias in zip(("q_proj", "k_proj", "v_proj"), biases, strict=True))
        self.out = _lora(attention.out_proj, cols=channels)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (layer(x).unflatten(-1, (-1, self.head_dim)).transpose(1, 2) for layer in (self.q, self.k, self.v))
        heads = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(self.head_dim))
        return self.out(heads.transpose(1, 2).flatten(-2))


class CompactBlock(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm1, self.norm2 = copy.deepcopy(block.norm1), copy.deepcopy(block.norm2)
        self.attn = CompactAttention(block.attn)
        active = torch.nonzero(block.fc1.out_mask).flatten()
        self.fc1, self.fc2 = _lora(block.fc1, rows=active), _lora(block.fc2, cols=active)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def compacted_stack(spa_model: Stack) -> Stack:
    """The LoRA model holding only ``spa_model``'s active heads and MLP channels."""
    with torch.no_grad():
        blocks = [CompactBlock(block) for block in spa_model.blocks]
        return Stack(blocks, copy.deepcopy(spa_model.norm), _lora(spa_model.head))


def draw_masks(shape: TransformerShape, density: float, generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
    """Per layer: (head mask, MLP channel mask) keeping ``density`` of each, at random."""
    def keep(count: int) -> Tensor:
        mask = torch.zeros(count, dtype=torch.bool)
        mask[torch.randperm(count, generator=generator)[:max(1, round(density * count))]] = True
        return mask

    return [(keep(shape.heads), keep(shape.mlp)) for _ in range(shape.layers)]


def spa_stack(base: Stack, shape: TransformerShape, masks, generator: torch.Generator) -> Stack:
    model = spa_kernels.convert(base, rank=shape.rank)
    redraw_adapters(model, generator)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SPLoRAMultiheadAttention):
                for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                    adapter = getattr(module, name).adapter
                    adapter.rows.copy_(torch.randn(adapter.rows.shape, generator=generator) * shape.width ** -0.5)
                    adapter.cols.copy_(torch.randn(adapter.cols.shape, generator=generator) * 0.5 / shape.rank ** 0.5)
    for block, (head_mask, mlp_mask) in zip(model.blocks, masks, strict=True):
        block.attn.set_masks(head_mask=head_mask)
        block.fc1.set_masks(out_mask=mlp_mask)
        block.fc2.set_masks(in_mask=mlp_mask)
    return model


def build_spa(shape: TransformerShape, density: float) -> tuple[Stack, Stack, list, Tensor, Tensor]:
    """The base stack, its pruned spa_kernels model, the masks, tokens and labels, from the suite's seeds."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DATA_SEED)
        base = base_stack(shape)
    generator = torch.Generator().manual_seed(DATA_SEED)
    tokens = torch.randn(shape.batch, shape.tokens, shape.width, generator=generator)
    labels = torch.randint(shape.classes, (shape.batch,), generator=generator)
    masks = draw_masks(shape, density, torch.Generator().manual_seed(MASK_SEED))
    return base, spa_stack(base, shape, masks, generator), masks, tokens, labels


def sp_adapters_stack(base: Stack, spa_model: Stack, shape: TransformerShape, masks) -> Stack:
    model = sp_adapters.SPLoRA(copy.deepcopy(base), rank=shape.rank)
    state = {key: value for key, value in spa_model.state_dict().items() if not key.endswith("mask")}
    model.load_state_dict(state)
    full = torch.ones(shape.width, dtype=torch.bool)
    mlp_masks = {}
    for index, (_, mlp_mask) in enumerate(masks):
        mlp_masks[f"blocks.{index}.fc1"] = (full, mlp_mask)
        mlp_masks[f"blocks.{index}.fc2"] = (mlp_mask, full)
    mask_with_hooks(model, mlp_masks)
    return model


def _step(model: nn.Module, tokens: Tensor, labels: Tensor):
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)

    def step() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        logits = model(tokens)
        F.cross_entropy(logits, labels).backward()
        optimizer.step()
        return logits.detach()

    return step


def _check(name: str, model: nn.Module, reference: nn.Module, tokens: Tensor, device, dtype) -> None:
    """``model``'s logits against ``reference``'s, in float64 and in the timed dtype."""
    with torch.no_grad():
        for cast, limit in ((torch.float64, FLOAT64_TOLERANCE), (dtype, 10 * tolerance(dtype))):
            got = copy.deepcopy(model).to(device, cast).train()(tokens.to(device, cast)).double()
            want = copy.deepcopy(reference).double().to(device).train()(tokens.double().to(device))
            error, scale = (got - want).abs().max().item(), want.abs().max().item()
            if not error <= limit * max(scale, 1e-30):
                raise ContenderMismatch(f"transformer: {name} logits ({cast}) differ from the reference by "
                                        f"{error:.3g} (largest value {scale:.3g}, allowed {limit:g} of it)")


class TransformerSuite:
    name = "transformer"

    def __init__(self, shapes: tuple[TransformerShape, ...] = SHAPES):
        self.shapes = shapes

    def count_cases(self, config: RunConfig) -> int:
        return len(self.shapes) * len(DENSITIES) + (VIT_B16 in self.shapes)  # and the compiled row

    def run(self, config: RunConfig, progress: Progress) -> SuiteReport:
        gate = CompileGate(config.compiled, SUITE_BUDGET_S, COMPILE_RESERVE_S)
        report = SuiteReport(self.name, notes=[
            "transformer: densities are the fraction of heads and of MLP channels kept in every layer "
            "(--keep does not apply). sp_adapters runs every head (see bench/transformer.py) and its logits "
            "are checked at density 1 only."])
        for shape in self.shapes:
            by_density = {density: self._run_density(shape, density, config, progress) for density in DENSITIES}
            dtype = str(config.dtype).removeprefix("torch.")
            title = f"transformer {shape} ({dtype}) — train step: median ms (p20–p80)"
            notes = ["keep = density of heads and MLP channels; full fine-tune and dense LoRA prune nothing "
                     "(timed at density 1)."]
            report.tables.append(results_table(title, by_density, RATIOS, SPA, notes))
            if config.device.type == "cpu" and shape == VIT_B16:
                report.targets += self._targets(by_density)
        if config.device.type != "cpu":
            report.notes.append("The transformer targets are CPU targets; they are not evaluated here.")
        if VIT_B16 in self.shapes:
            self._compiled_row(report, gate, config, progress)
        return report

    @staticmethod
    def _compiled_row(report: SuiteReport, gate: CompileGate, config: RunConfig, progress: Progress) -> None:
        """The ViT-B/16 spa model at density 0.5 under ``torch.compile`` against eager (optional, see bench.compiled)."""
        progress.begin(f"transformer {VIT_B16.name} density 0.5: torch.compile vs eager")
        device, dtype = config.device, config.dtype

        def row():
            _, spa_model, _, tokens, labels = build_spa(VIT_B16, 0.5)
            tokens, labels = tokens.to(device, dtype), labels.to(device)
            title = (f"transformer {VIT_B16} ({str(dtype).removeprefix('torch.')}), {SPA} at density 0.5 — "
                     "train step, eager vs compiled: median ms (p20–p80)")
            return compiled_vs_eager(
                title, spa_model.to(device, dtype), lambda model: _step(model, tokens, labels), device, dtype,
                config.budget, 0.5, f"transformer {VIT_B16.name} {SPA}")

        add_compiled_row(report, gate, "transformer", row, device.type == "cpu")
        progress.end()

    @staticmethod
    def _targets(times: dict[float, dict[str, Measurement]]) -> list[TargetResult]:
        def ratio(density_a, name_a, density_b, name_b) -> float | None:
            a, b = times.get(density_a, {}).get(name_a), times.get(density_b, {}).get(name_b)
            return None if a is None or b is None else a.median_ms / b.median_ms

        return [
            TargetResult("train step", 0.5, "sp_adapters ÷ spa", "≥", TARGET_SP_ADAPTERS,
                         ratio(0.5, SP_ADAPTERS, 0.5, SPA)),
            TargetResult("train step", 0.5, "spa ÷ compacted", "≤", TARGET_COMPACTED, ratio(0.5, SPA, 0.5, COMPACTED)),
            TargetResult("train step", 0.5, "sp_adapters ÷ spa compact act.", "≥", TARGET_SP_ADAPTERS,
                         ratio(0.5, SP_ADAPTERS, 0.5, SPA_COMPACT)),
            TargetResult("train step", 0.5, "spa compact act. ÷ compacted", "≤", TARGET_COMPACTED,
                         ratio(0.5, SPA_COMPACT, 0.5, COMPACTED)),
            TargetResult("train step", 0.3, "spa at 1.0 ÷ spa at 0.3", "≥", TARGET_DENSITY_SPEEDUP,
                         ratio(1.0, SPA, 0.3, SPA)),
        ]

    @staticmethod
    def _run_density(shape: TransformerShape, density: float, config: RunConfig,
                     progress: Progress) -> dict[str, Measurement]:
        progress.begin(f"transformer {shape.name} density {format_keep(density)}: build, check, time")
        device, dtype = config.device, config.dtype
        base, spa_model, masks, tokens, labels = build_spa(shape, density)
        compact = compacted_stack(spa_model)
        # The same model with the MLP's hidden activations compacted (the attention core skips pruned heads
        # either way; the residual stream feeds the plain head, so it stays whole).
        compact_act = spa_kernels.compact_activations(copy.deepcopy(spa_model), (tokens,))
        versions = {SPA: spa_model, SPA_COMPACT: compact_act, COMPACTED: compact,
                    SP_ADAPTERS: sp_adapters_stack(base, spa_model, shape, masks)}
        _check(SPA, spa_model, compact, tokens, device, dtype)
        _check(SPA_COMPACT, compact_act, compact, tokens, device, dtype)
        if density == 1.0:
            _check(SP_ADAPTERS, versions[SP_ADAPTERS], compact, tokens, device, dtype)
            full = copy.deepcopy(base).requires_grad_(True)
            versions[FULL] = full
            versions[DENSE_LORA] = compacted_stack(spa_model)  # nothing pruned: the whole LoRA model
            _check(FULL, full, base, tokens, device, dtype)
        tokens, labels = tokens.to(device, dtype), labels.to(device)
        steps = {name: _step(model.to(device, dtype), tokens, labels) for name, model in versions.items()}
        times = measure_interleaved(steps, device, config.budget)
        progress.end()
        return times


SUITE = TransformerSuite()
