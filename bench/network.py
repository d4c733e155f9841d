"""The network suite: one training step of a channel-pruned ResNet-18 with SPLoRA adapters.

Three versions of one network, with the same weights, adapters and masks (see
:mod:`bench.resnet`), each timed for a whole training step (forward, cross-entropy
loss, backward, SGD step on the trainable parameters: adapters, batch norms, head
bias):

* ``spa_kernels``: ``spa_kernels.convert(model, rank=16)`` and ``set_masks`` on
  every converted layer;
* ``sp_adapters``: ``sp_adapters.SPLoRA(model, rank=16)``, masked the way
  mask-based pruning does it: forward hooks multiply each layer's input and output
  by its masks;
* ``spa compact act.``: the spa_kernels network after
  ``spa_kernels.compact_activations`` (tensors between SPA layers hold only the
  active channels);
* ``compacted``: a physically smaller network holding only the active channels,
  the adapters as parallel 1×1 convolutions: the practical limit.

Before timing, each version's logits and gradients are checked against a float64
evaluation of the sp_adapters network.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import sp_adapters
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import spa_kernels

from . import Progress, RunConfig
from .anchors import COMPACTED, SP_ADAPTERS, ContenderMismatch, spa_kernels_name, tolerance
from .conv import backend_notes, results_table
from .conv_anchors import conv_op_backends
from .linear import SPA, Ratio, timed_backends
from .report import SuiteReport, TargetResult
from .resnet import Masks, ResNet, compacted_gradients, compacted_network, draw_masks
from .shapes import DATA_SEED, MASK_SEED, NETWORK_SHAPES, RESNET18_56, NetworkShape, format_keep
from .timing import measure_interleaved

SPA_COMPACT = "spa compact act."
RATIOS = (
    Ratio("sp_adapters ÷ spa", SP_ADAPTERS, SPA),
    Ratio("spa ÷ compacted", SPA, COMPACTED),
    Ratio("spa c.a. ÷ compacted", SPA_COMPACT, COMPACTED),
)
TARGET_RATIO = 2.5  # CPU: sp_adapters ÷ spa_kernels, one training step of RESNET18_56
TARGET_COMPACT = 1.1  # CPU: spa compact act. ÷ compacted, the same step

LEARNING_RATE = 1e-3
MOMENTUM = 0.9
CHECK_IMAGES = 2  # images in the float64 gradient check
FLOAT64_TOLERANCE = 1e-8  # relative to the largest reference value; ~20 layers deep


@dataclass
class NetworkContender:
    name: str
    step: Callable[[], None]


def _contender(name: str, model: nn.Module, images: Tensor, labels: Tensor) -> NetworkContender:
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=LEARNING_RATE, momentum=MOMENTUM)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return NetworkContender(name, step)


Gradients = Callable[[nn.Module], dict[str, Tensor]]


def trainable_gradients(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def forward_backward(model: nn.Module, images: Tensor, labels: Tensor,
                     gradients: Gradients = trainable_gradients) -> tuple[Tensor, dict[str, Tensor]]:
    """The logits and named gradients of one forward and backward pass of ``model`` (no optimiser step)."""
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(images)
    F.cross_entropy(logits, labels).backward()
    grads = gradients(model)
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def redraw_adapters(model: nn.Module, generator: torch.Generator) -> None:
    """Give every adapter values of a trained one (``B`` is near zero right after conversion).

    With ``B ≈ 0`` the adapter would hardly change the logits, and the check before
    timing could not tell a missing adapter term from a correct one.
    """
    with torch.no_grad():
        for module in model.modules():
            adapter = getattr(module, "adapter", None)
            if adapter is None or not hasattr(adapter, "rows"):
                continue
            rows, cols = adapter.rows, adapter.cols  # (1, r, in), (1, out, r)
            rows.copy_(torch.randn(rows.shape, generator=generator) * rows.shape[-1] ** -0.5)
            cols.copy_(torch.randn(cols.shape, generator=generator) * 0.5 * cols.shape[-1] ** -0.5)


def mask_with_hooks(model: nn.Module, masks: Masks) -> None:
    """Multiply each masked layer's input and output by its masks (all-ones masks are skipped).

    The 0/1 factors are non-persistent buffers of the layer, so they follow the model
    through ``.to()`` and ``copy.deepcopy`` without entering its state dict.
    """

    def mask_input(layer: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return (inputs[0] * layer.bench_in_factor,)

    def mask_output(layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        return output * layer.bench_out_factor

    for name, (in_mask, out_mask) in masks.items():
        layer = model.get_submodule(name)
        weight = layer.weight
        spatial = (1,) * (weight.dim() - 2)  # broadcast over (N, C, *spatial)
        if not bool(in_mask.all()):
            factor = in_mask.to(weight.device, weight.dtype).reshape(-1, *spatial)
            layer.register_buffer("bench_in_factor", factor, persistent=False)
            layer.register_forward_pre_hook(mask_input)
        if not bool(out_mask.all()):
            factor = out_mask.to(weight.device, weight.dtype).reshape(-1, *spatial)
            layer.register_buffer("bench_out_factor", factor, persistent=False)
            layer.register_forward_hook(mask_output)


def spa_kernels_network(base: nn.Module, masks: Masks, source: nn.Module, rank: int) -> tuple[nn.Module | None, str]:
    """``spa_kernels.convert(base)`` with ``source``'s adapters and ``masks``; (None, why) if it cannot be built."""
    model = spa_kernels.convert(base, rank=rank)
    unconverted = [name for name in masks if not isinstance(model.get_submodule(name), spa_kernels.nn.ChannelMasked)]
    if unconverted:
        return None, f"spa_kernels.convert leaves {', '.join(unconverted[:3])} … unconverted"
    result = model.load_state_dict(source.state_dict(), strict=False)
    stray = [key for key in result.missing_keys if not key.endswith(("in_mask", "out_mask"))]
    if stray or result.unexpected_keys:
        return None, f"state dicts differ: missing {stray[:3]}, unexpected {result.unexpected_keys[:3]}"
    for name, (in_mask, out_mask) in masks.items():
        model.get_submodule(name).set_masks(in_mask, out_mask)
    return model, ""


def compact_activations_model(spa_model: nn.Module, example: Tensor) -> tuple[nn.Module | None, str]:
    """A copy of ``spa_model`` after ``spa_kernels.compact_activations``; (None, why) where there is none."""
    transform = getattr(spa_kernels, "compact_activations", None)
    if transform is None:
        return None, "spa_kernels has no compact_activations"
    model = copy.deepcopy(spa_model)
    result = transform(model, (example,))
    return (result if isinstance(result, nn.Module) else model).train(), ""


def _compare(name: str, got: Tensor, want: Tensor, limit: float) -> None:
    if tuple(got.shape) != tuple(want.shape):
        raise ContenderMismatch(f"network: {name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    scale = want.abs().max().item() if want.numel() else 0.0
    error = (got.double() - want).abs().max().item() if want.numel() else 0.0
    if not error <= limit * max(scale, 1e-30):
        raise ContenderMismatch(
            f"network: {name} differs from the float64 network by {error:.3g} "
            f"(largest reference value {scale:.3g}, allowed {limit:g} of it)"
        )


class NetworkSuite:
    name = "network"

    def shapes(self, config: RunConfig) -> tuple[NetworkShape, ...]:
        return NETWORK_SHAPES[config.device.type]

    def count_cases(self, config: RunConfig) -> int:
        return 2 * len(self.shapes(config))  # build and check, then time

    def run(self, config: RunConfig, progress: Progress) -> SuiteReport:
        # The modules pick their backend automatically: the fastest one that runs the conv op.
        conv_backends, _ = conv_op_backends(config.device, config.dtype, timed_backends(config.device))
        primary = spa_kernels_name(conv_backends[0]) if conv_backends else None
        report = SuiteReport(self.name, notes=backend_notes(config.device, conv_backends[:1], "network"))
        for shape in self.shapes(config):
            report.notes.append(f"network: every convolution keeps {format_keep(shape.keep)} of its input and "
                                "output channels (--keep does not apply to this suite).")
            contenders, why = self._build(shape, config, primary, progress)
            if why:
                report.notes.append(f"WARNING: network: no spa_kernels version ({why}).")
            report.notes.append("network contenders present: " + ", ".join(c.name for c in contenders) + ".")
            progress.begin(f"network {shape.name}: train step, {len(contenders)} contenders interleaved")
            times = measure_interleaved({c.name: c.step for c in contenders}, config.device, config.budget)
            progress.end()
            dtype = str(config.dtype).removeprefix("torch.")
            title = f"network {shape} ({dtype}) — train step: median ms (p20–p80)"
            notes = ["train step = forward, cross-entropy loss, backward, SGD step (momentum) on the trainable "
                     "parameters (adapters, batch norms, head bias); frozen weights get no gradient."]
            report.tables.append(results_table(title, {shape.keep: times}, RATIOS, primary, notes))
            if config.device.type == "cpu" and shape == RESNET18_56:
                value = None
                if primary is not None and primary in times:
                    value = times[SP_ADAPTERS].median_ms / times[primary].median_ms
                ratio = f"{SP_ADAPTERS} ÷ {primary or 'spa_kernels'}"
                report.targets.append(TargetResult("train step", shape.keep, ratio, "≥", TARGET_RATIO, value))
                compact = None
                if SPA_COMPACT in times:
                    compact = times[SPA_COMPACT].median_ms / times[COMPACTED].median_ms
                report.targets.append(TargetResult("train step", shape.keep, f"{SPA_COMPACT} ÷ {COMPACTED}", "≤",
                                                   TARGET_COMPACT, compact))
                if primary is None or value is None:
                    report.targets_note = "WARNING: there is no spa_kernels network to evaluate."
                elif primary != spa_kernels_name("cpu"):
                    report.targets_note = (
                        f"WARNING: the spa_kernels network ran its convolutions on {primary}; "
                        "this says nothing about the fused kernels."
                    )
        if config.device.type != "cpu":
            report.notes.append("The network target is a CPU target; it is not evaluated here.")
        return report

    @staticmethod
    def _build(shape: NetworkShape, config: RunConfig, primary: str | None,
               progress: Progress) -> tuple[list[NetworkContender], str]:
        progress.begin(f"network {shape.name}: building and checking every version")
        device, dtype = config.device, config.dtype
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(DATA_SEED)
            base = ResNet(shape)
        masks = draw_masks(shape, torch.Generator().manual_seed(MASK_SEED))
        generator = torch.Generator().manual_seed(DATA_SEED)
        images = torch.randn(shape.batch, 3, shape.image_size, shape.image_size, generator=generator)
        labels = torch.randint(shape.classes, (shape.batch,), generator=generator)

        adapted = sp_adapters.SPLoRA(base, rank=shape.rank)
        redraw_adapters(adapted, generator)
        compact = compacted_network(adapted, masks)
        spa_model, why = None, "no spa_kernels backend runs splora_conv2d here"
        if primary is not None:
            spa_model, why = spa_kernels_network(base, masks, adapted, shape.rank)
        mask_with_hooks(adapted, masks)
        versions: list[tuple[str, nn.Module, Gradients]] = [
            (COMPACTED, compact, lambda model: compacted_gradients(model, masks, want_grads)),
            (SP_ADAPTERS, adapted, trainable_gradients),
        ]
        if spa_model is not None:
            versions.insert(0, (primary, spa_model, trainable_gradients))
            compact_act, _ = compact_activations_model(spa_model, images[:1])
            if compact_act is not None:  # without it the compact target reads "not evaluated"
                versions.insert(1, (SPA_COMPACT, compact_act, trainable_gradients))

        # Gradients are compared on float64 copies: a ReLU input within rounding of zero
        # flips its gradient between two fp32 evaluations, so only float64 compares them
        # tightly.  They see the first CHECK_IMAGES images only (float64 convolutions are
        # slow); the logits of the whole batch are compared in the compute dtype, which
        # checks the timed path end to end (the conv suite checks the kernels' gradients).
        reference = copy.deepcopy(adapted).double().to(device)
        with torch.no_grad():
            want_logits = reference.train()(images.double().to(device))
        images64, labels64 = images[:CHECK_IMAGES].double().to(device), labels[:CHECK_IMAGES].to(device)
        want_logits64, want_grads = forward_backward(reference, images64, labels64)
        del reference
        images, labels = images.to(device, dtype), labels.to(device)
        contenders = []
        for name, model, gradients in versions:
            model64 = copy.deepcopy(model).double().to(device)
            logits, grads = forward_backward(model64, images64, labels64, gradients)
            del model64
            _compare(f"{name} logits (float64)", logits, want_logits64, FLOAT64_TOLERANCE)
            if set(grads) != set(want_grads):
                raise ContenderMismatch(f"network: {name} trains {sorted(set(grads) ^ set(want_grads))[:4]}, "
                                        "unlike the float64 network")
            for parameter, grad in grads.items():
                _compare(f"{name} gradient of {parameter} (float64)", grad, want_grads[parameter], FLOAT64_TOLERANCE)
            model = model.to(device, dtype)
            with torch.no_grad():
                logits = model.train()(images)
            _compare(f"{name} logits", logits, want_logits, 10 * tolerance(dtype))
            contenders.append(_contender(name, model, images, labels))
        progress.end()
        return contenders, why


SUITE = NetworkSuite()
