"""The resnet50 suite: one training step of a channel-pruned bottleneck ResNet-50 (Hugging Face).

The model is ``transformers.ResNetForImageClassification(ResNetConfig(num_labels=10))``
(the default configuration is ResNet-50: bottleneck blocks, depths 3-4-6-3), built with
random weights; nothing is downloaded.  Its batch norms get the affine values of a
trained network (freshly initialised ones are 1 and 0, which would hide a missing norm
mask).  ``spa_kernels.convert(model, rank=8, exclude=["classifier"])`` adapts every
convolution; the head stays a plain trainable linear layer.

At density ``p`` every prunable channel group (``spa_kernels.pruning.channel_groups``:
the stem, the residual streams of stages 1-3 and the two inner widths of every block;
the last stage's stream reaches the plain head and is not prunable) keeps a seeded
random ``p`` of its channels, applied with ``group.apply``.  Contenders, from the same
weights, adapters and masks:

* ``spa masked``: the converted, pruned model at full width;
* ``spa compact act.``: the same after ``spa_kernels.compact_activations(model, (x,))``
  (tensors between SPA layers hold only the active channels), where spa_kernels has it;
* ``compacted``: ``spa_kernels.compact(model, (x,))``, the physically smaller plain model
  with the adapters merged; its convolution weights are frozen and its norms and head
  train, as in the SPA model, without adapters: the lower bound;
* ``sp_adapters``: ``sp_adapters.SPLoRA`` on the convolutions (rank 8, the same
  adapters), masked by hooks on each layer's input and output (mask-based pruning);
* ``full fine-tune`` (density 1 only): the merged unpruned model, every parameter trained.

A train step is forward, cross-entropy, backward and an SGD step (momentum 0.9) on the
trainable parameters.  Before timing, every contender's logits are checked against the
spa masked model's, in float64 on two images and in the compute dtype on the batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import sp_adapters
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import spa_kernels
from spa_kernels.pruning import channel_groups

from . import Progress, RunConfig
from .anchors import COMPACTED, SP_ADAPTERS, ContenderMismatch, tolerance
from .compiled import CompileGate, add_compiled_row, compiled_vs_eager
from .conv import results_table
from .linear import Ratio
from .network import SPA_COMPACT, compact_activations_model, mask_with_hooks, redraw_adapters
from .report import SuiteReport, Table, TargetResult
from .shapes import DATA_SEED, MASK_SEED, RESNET50_112, BottleneckShape, active_count, format_keep
from .timing import Measurement, measure_interleaved

SPA_MASKED = "spa masked"
FULL = "full fine-tune"
NOT_AVAILABLE = "not available"
DENSITIES = (1.0, 0.5, 0.3)
EXCLUDE = ("classifier",)

RATIOS = (
    Ratio("sp_adapters ÷ spa c.a.", SP_ADAPTERS, SPA_COMPACT),
    Ratio("spa c.a. ÷ compacted", SPA_COMPACT, COMPACTED),
    Ratio("sp_adapters ÷ spa", SP_ADAPTERS, SPA_MASKED),
    Ratio("spa ÷ compacted", SPA_MASKED, COMPACTED),
    Ratio("spa ÷ full", SPA_MASKED, FULL),
)
# CPU targets (fp32, 2 threads) on RESNET50_112.
TARGET_COMPACT_50 = 1.15  # spa compact act. ÷ compacted at 0.5
TARGET_SP_ADAPTERS_50 = 2.5  # sp_adapters ÷ spa compact act. at 0.5
TARGET_COMPACT_30 = 1.2  # spa compact act. ÷ compacted at 0.3
TARGET_FULL_100 = 0.85  # spa masked ÷ full fine-tune at 1.0

SUITE_BUDGET_S = 180.0  # the whole suite, 2 quiet CPU cores
COMPILE_RESERVE_S = 120.0  # compiling a ResNet-50 train step, and timing it, on 2 cores
LEARNING_RATE = 1e-3
MOMENTUM = 0.9
CHECK_IMAGES = 2  # images in the float64 check
FLOAT64_TOLERANCE = 1e-8


def logits(model: nn.Module, images: Tensor) -> Tensor:
    return model(images).logits


def train_step(model: nn.Module, images: Tensor, labels: Tensor) -> Callable[[], Tensor]:
    """One SGD step on ``model``'s trainable parameters per call; returns the step's logits."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE,
                                momentum=MOMENTUM)

    def step() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        out = logits(model, images)
        F.cross_entropy(out, labels).backward()
        optimizer.step()
        return out.detach()

    return step


def base_model(shape: BottleneckShape) -> nn.Module:
    """The Hugging Face ResNet-50 with random weights and batch norms that look trained."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_labels=shape.classes)
    if config.layer_type != "bottleneck" or list(config.depths) != [3, 4, 6, 3]:
        raise RuntimeError(f"transformers' default ResNetConfig is no longer ResNet-50: {config}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DATA_SEED)
        model = ResNetForImageClassification(config)
    generator = torch.Generator().manual_seed(DATA_SEED)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.normal_(1.0, 0.2, generator=generator)
                module.bias.normal_(0.0, 0.2, generator=generator)
    return model.train()


def prune(model: nn.Module, groups: list, density: float) -> None:
    """Keep a seeded random ``density`` of every group's channels (nothing to do at 1)."""
    if density == 1.0:
        return
    generator = torch.Generator().manual_seed(MASK_SEED)
    for group in groups:
        keep = torch.zeros(group.size, dtype=torch.bool)
        keep[torch.randperm(group.size, generator=generator)[:active_count(group.size, density)]] = True
        group.apply(model, keep)


def layer_masks(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """Every SPA layer's (input mask, output mask), as bools, by module name."""
    return {name: (module.in_mask.bool().cpu(), module.out_mask.bool().cpu())
            for name, module in model.named_modules() if isinstance(module, spa_kernels.nn.ChannelMasked)}


def sp_adapters_model(base: nn.Module, spa_model: nn.Module, rank: int) -> nn.Module:
    """``sp_adapters.SPLoRA`` on ``base``'s convolutions with ``spa_model``'s adapters, masked by hooks."""
    model = sp_adapters.SPLoRA(base, rank=rank, replacements=[(nn.Conv2d, sp_adapters.SPLoRAConv2d)])
    state = {key: value for key, value in spa_model.state_dict().items() if not key.endswith(("in_mask", "out_mask"))}
    model.load_state_dict(state, strict=True)
    mask_with_hooks(model, layer_masks(spa_model))
    return model


def compacted_model(spa_model: nn.Module, example: Tensor) -> nn.Module:
    """``spa_kernels.compact``, training what the SPA model trains outside its adapters (norms, head).

    Compacted in float64, so that the merged weights ``W + s·B A`` are exact for the
    float64 check; the timed copy is cast to the compute dtype like every contender.
    """
    model = spa_kernels.compact(copy.deepcopy(spa_model).double(), (example.double(),))
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            module.weight.requires_grad_(False)
        elif isinstance(module, nn.BatchNorm2d) or any(name == e or name.startswith(e + ".") for e in EXCLUDE):
            module.requires_grad_(True)
    return model.train()


class Checker:
    """Compares a contender's logits with the spa masked model's, in float64 and the compute dtype."""

    def __init__(self, reference: nn.Module, images: Tensor, device: torch.device, dtype: torch.dtype):
        self.images, self.device, self.dtype = images, device, dtype
        self.want64 = self._logits(reference, torch.float64, images[:CHECK_IMAGES])
        self.want = self._logits(reference, dtype, images)

    def _logits(self, model: nn.Module, cast: torch.dtype, images: Tensor) -> Tensor:
        # A copy: a train-mode forward moves the batch-norm statistics.
        copied = copy.deepcopy(model).to(self.device, cast).train()
        with torch.no_grad():
            return logits(copied, images.to(self.device, cast)).double().cpu()

    def check(self, name: str, model: nn.Module, density: float) -> None:
        cases = ((torch.float64, self.images[:CHECK_IMAGES], self.want64, FLOAT64_TOLERANCE),
                 (self.dtype, self.images, self.want, 10 * tolerance(self.dtype)))
        for cast, images, want, limit in cases:
            got = self._logits(model, cast, images)
            error, scale = (got - want).abs().max().item(), want.abs().max().item()
            if tuple(got.shape) != tuple(want.shape) or not error <= limit * max(scale, 1e-30):
                raise ContenderMismatch(
                    f"resnet50 density {format_keep(density)}: {name} logits ({str(cast).removeprefix('torch.')}) "
                    f"differ from the spa masked model's by {error:.3g} (largest value {scale:.3g}, allowed "
                    f"{limit:g} of it)")


class ResNet50Suite:
    name = "resnet50"

    def __init__(self, shape: BottleneckShape = RESNET50_112):
        self.shape = shape

    def count_cases(self, config: RunConfig) -> int:
        return 2 * len(DENSITIES) + 1  # build and check, then time, per density; the compiled row

    def run(self, config: RunConfig, progress: Progress) -> SuiteReport:
        gate = CompileGate(config.compiled, SUITE_BUDGET_S, COMPILE_RESERVE_S)
        shape, device, dtype = self.shape, config.device, config.dtype
        report = SuiteReport(self.name, notes=[
            f"resnet50: Hugging Face ResNetForImageClassification(ResNetConfig()) (ResNet-50, bottleneck, depths "
            f"3-4-6-3), random weights; densities {', '.join(map(format_keep, DENSITIES))} of every prunable "
            "channel group (--keep does not apply)."])
        progress.begin("resnet50: building the model and its channel groups")
        base = base_model(shape)
        generator = torch.Generator().manual_seed(DATA_SEED)
        images = torch.randn(shape.batch, 3, shape.image_size, shape.image_size, generator=generator)
        labels = torch.randint(shape.classes, (shape.batch,), generator=generator)
        converted = spa_kernels.convert(base, rank=shape.rank, exclude=list(EXCLUDE))
        redraw_adapters(converted, generator)
        example = images[:1]
        groups = channel_groups(converted, (example,))
        by_density: dict[float, dict[str, Measurement]] = {}
        why_no_compact_act = ""
        pruned_half = None
        for density in DENSITIES:
            progress.begin(f"resnet50 density {format_keep(density)}: build every contender, check its logits")
            spa_model = copy.deepcopy(converted)
            prune(spa_model, groups, density)
            if density == 0.5:
                pruned_half = spa_model
            models, why_no_compact_act = self._contenders(base, spa_model, example, density, shape.rank)
            checker = Checker(spa_model, images, device, dtype)
            for name, model in models.items():
                if name != SPA_MASKED:
                    checker.check(name, model, density)
            progress.end()
            progress.begin(f"resnet50 density {format_keep(density)}: train step, {len(models)} contenders")
            x, y = images.to(device, dtype), labels.to(device)
            steps = {name: train_step(model.to(device, dtype), x, y) for name, model in models.items()}
            by_density[density] = measure_interleaved(steps, device, config.budget)
            progress.end()

        table = results_table(self._title(config), by_density, RATIOS, SPA_MASKED, self._table_notes(len(groups)))
        if why_no_compact_act:
            _mark_not_available(table, SPA_COMPACT, 2)
            table.notes.append(f"{SPA_COMPACT}: {NOT_AVAILABLE} ({why_no_compact_act}); nothing is timed for it.")
        report.tables.append(table)
        if device.type == "cpu":
            report.targets += self._targets(by_density)
            if why_no_compact_act:
                report.targets_note = (f"{SPA_COMPACT} is {NOT_AVAILABLE} ({why_no_compact_act}): "
                                       "its targets are skipped.")
        else:
            report.notes.append("The resnet50 targets are CPU targets; they are not evaluated here.")

        progress.begin("resnet50 density 0.5: torch.compile vs eager")

        def row():
            title = (f"resnet50 {SPA_MASKED} at density 0.5, batch {shape.batch} × {shape.image_size}² "
                     f"({str(dtype).removeprefix('torch.')}) — train step, eager vs compiled: median ms (p20–p80)")
            x, y = images.to(device, dtype), labels.to(device)
            return compiled_vs_eager(
                title, pruned_half.to(device, dtype), lambda model: train_step(model, x, y), device, dtype,
                config.budget, 0.5, f"resnet50 {SPA_MASKED}")

        add_compiled_row(report, gate, "resnet50", row, device.type == "cpu")
        progress.end()
        return report

    @staticmethod
    def _contenders(base: nn.Module, spa_model: nn.Module, example: Tensor, density: float,
                    rank: int) -> tuple[dict[str, nn.Module], str]:
        models: dict[str, nn.Module] = {SPA_MASKED: spa_model}
        compact_act, why = compact_activations_model(spa_model, example)
        if compact_act is not None:
            models[SPA_COMPACT] = compact_act
        compacted = compacted_model(spa_model, example)
        models[COMPACTED] = compacted
        models[SP_ADAPTERS] = sp_adapters_model(base, spa_model, rank)
        if density == 1.0:
            models[FULL] = copy.deepcopy(compacted).requires_grad_(True)  # merged, nothing pruned
        return models, why

    def _title(self, config: RunConfig) -> str:
        dtype = str(config.dtype).removeprefix("torch.")
        return f"resnet50 {self.shape} ({dtype}) — train step: median ms (p20–p80)"

    @staticmethod
    def _table_notes(group_count: int) -> list[str]:
        return [
            f"keep = density of each of the {group_count} prunable channel groups (seeded random channels); "
            "the last stage's 2048-channel stream feeds the plain head and stays whole.",
            "train step = forward, cross-entropy, backward, SGD step (momentum 0.9) on the trainable parameters: "
            "adapters, batch norms and head (spa, sp_adapters); batch norms and head (compacted: adapters merged, "
            "convolutions frozen, the lower bound); everything (full fine-tune, density 1 only, adapters merged).",
            "sp_adapters is masked by hooks that multiply each convolution's input and output by its masks.",
        ]

    @staticmethod
    def _targets(times: dict[float, dict[str, Measurement]]) -> list[TargetResult]:
        def ratio(density: float, numerator: str, denominator: str) -> float | None:
            a, b = times.get(density, {}).get(numerator), times.get(density, {}).get(denominator)
            return None if a is None or b is None else a.median_ms / b.median_ms

        return [
            TargetResult("train step", 0.5, f"{SPA_COMPACT} ÷ {COMPACTED}", "≤", TARGET_COMPACT_50,
                         ratio(0.5, SPA_COMPACT, COMPACTED)),
            TargetResult("train step", 0.5, f"{SP_ADAPTERS} ÷ {SPA_COMPACT}", "≥", TARGET_SP_ADAPTERS_50,
                         ratio(0.5, SP_ADAPTERS, SPA_COMPACT)),
            TargetResult("train step", 0.3, f"{SPA_COMPACT} ÷ {COMPACTED}", "≤", TARGET_COMPACT_30,
                         ratio(0.3, SPA_COMPACT, COMPACTED)),
            TargetResult("train step", 1.0, f"{SPA_MASKED} ÷ {FULL}", "≤", TARGET_FULL_100,
                         ratio(1.0, SPA_MASKED, FULL)),
        ]


def _mark_not_available(table: Table, name: str, position: int) -> None:
    """Give ``name`` a column saying it was not timed (``results_table`` shows only what ran)."""
    if name in table.headers:
        return
    table.headers.insert(position, name)
    for row in table.rows:
        row.insert(position, NOT_AVAILABLE)


SUITE = ResNet50Suite()
