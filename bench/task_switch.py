"""The task suite: how small a task package is, and how fast it switches a shared base to a task.

A ResNet-18 (:mod:`bench.resnet`, the ``RESNET18_56`` shape with 10 classes) is
converted with ``spa_kernels.convert`` and pruned to 30 % of the channels of every
convolution, with masks consistent along every connection (:func:`bench.resnet.draw_masks`);
its adapters get random values of a trained one.  Two such tasks on one base are
saved with :func:`spa_kernels.pruning.package.save_task`.

**Size.**  A task package stores, per SPA layer (every convolution and the head),
the masks, ``A[:, S]``, ``B[O]`` and ``b[O]`` (the convolutions have no bias, the head
has one), plus a header and a checksum, deflated losslessly by default (codec 1;
the uncompressed size is shown beside it).  Its fine-pruned counterpart is what a
fine-pruned copy of the network must store per task: the active block of every layer
and its bias on the active outputs, ``|O|·|S|·k + |O|`` values per layer in the same
dtype (no masks or header counted for it); it is also shown deflated by the same
codec, for a like-for-like comparison.  The batch norms are frozen with the base
in the first rows; the last row counts them for both: the package stores their full
state (they are ``task_specific``), the fine-pruned copy their four per-channel
vectors on the active channels.

**Switch.**  The median time to switch a loaded base between the two tasks,
alternately, reading each task from its file:

* ``load_task``: the task package (masks via ``set_masks``, active entries written,
  inactive ones zeroed);
* ``state dict``: ``torch.load`` + ``load_state_dict`` of the SPA model's full-width
  trainable state (adapters, biases, masks): switching without packages;
* ``fine-pruned``: ``torch.load`` + ``load_state_dict`` of the fine-pruned copy's
  weights into a compacted network: what switching between fine-pruned copies costs.

Before timing, each switch is checked: the switched model's logits must equal
(``load_task``, ``state dict``) or match (``fine-pruned``, another computation order)
those of the task's own model.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import spa_kernels
from spa_kernels.pruning import load_task, save_task, task_size
from spa_kernels.pruning.package_format import byte_planes

from . import Progress, RunConfig
from .anchors import ContenderMismatch, tolerance
from .network import redraw_adapters
from .report import SuiteReport, Table, TargetResult, format_ratio
from .resnet import Masks, ResNet, compacted_network, draw_masks, norm_channels
from .shapes import DATA_SEED, MASK_SEED, RESNET18_56, NetworkShape, format_keep
from .timing import Measurement, measure_interleaved

TASK_SHAPE = dataclasses.replace(RESNET18_56, classes=10, rank=8, keep=0.3)
SIZE_RANKS = (4, 8, 16)  # rows of the size table; the targets concern TASK_SHAPE.rank
SIZE_TARGET = 0.02  # package ÷ fine-pruned
LOAD_TARGET_MS = 50.0  # load_task onto a loaded base, CPU
CHECK_IMAGES = 2

LOAD_TASK = "load_task"
LOAD_TASK_NORMS = "load_task + norms"
STATE_DICT = "state dict"
FINE_PRUNED = "fine-pruned"


@dataclass
class QuantityTarget(TargetResult):
    """A target on a quantity with a unit (``%``, ``ms``) rather than a speed ratio."""

    unit: str = ""
    multiplier: float = 1.0  # shown value = value × multiplier (fractions as percent)

    def _show(self, value: float) -> str:
        shown = value * self.multiplier
        return f"{shown:.3g} {self.unit}" if self.unit == "ms" else f"{shown:.3g}{self.unit}"

    def __str__(self) -> str:
        what = f"{self.mode} keep {format_keep(self.keep)}: {self.ratio} {self.comparison} {self._show(self.limit)}"
        if self.value is None:
            return f"SKIP  {what} (not measured here)"
        return f"{self.status}  {what}, measured {self._show(self.value)}"


# --------------------------------------------------------------------------- building the tasks


def spa_layers(model: nn.Module) -> dict[str, spa_kernels.nn.ChannelMasked]:
    """Every SPA layer of ``model`` by qualified name, in ``named_modules`` order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, spa_kernels.nn.ChannelMasked)}


def task_model(base: nn.Module, shape: NetworkShape, rank: int, seed: int) -> tuple[nn.Module, Masks]:
    """``base`` converted at ``rank``, pruned with masks drawn from ``seed``, adapters and head bias redrawn.

    The batch norms keep the base's values: they are frozen with the base in the
    target configuration, so a package without them switches the whole task.
    """
    model = spa_kernels.convert(base, rank=rank)
    generator = torch.Generator().manual_seed(seed)
    masks = draw_masks(shape, generator)
    for name, (in_mask, out_mask) in masks.items():
        model.get_submodule(name).set_masks(in_mask, out_mask)
    redraw_adapters(model, generator)
    with torch.no_grad():
        model.fc.bias.copy_(torch.randn(model.fc.bias.shape, generator=generator))
    return model.eval(), masks


def redraw_norms(base: nn.Module, generator: torch.Generator) -> None:
    """Give every batch norm values of a trained one.

    Freshly initialised norms (ones, zeros) would deflate to almost nothing and
    flatter the size of a package that stores them.
    """
    with torch.no_grad():
        for module in base.modules():
            if isinstance(module, nn.BatchNorm2d):
                channels = module.num_features
                module.weight.copy_(1 + 0.2 * torch.randn(channels, generator=generator))
                module.bias.copy_(0.1 * torch.randn(channels, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(channels, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(channels, generator=generator))


def spa_state(model: nn.Module) -> dict[str, Tensor]:
    """The full-width per-task state of every SPA layer: adapters, bias, masks (not the frozen weight)."""
    state = {}
    for name, layer in spa_layers(model).items():
        for key, value in layer.state_dict().items():
            if key != "weight":
                state[f"{name}.{key}"] = value
    return state


def fine_pruned_values(model: nn.Module, masks: Masks, norms: bool) -> int:
    """Values a fine-pruned copy stores per task: ``|O|·|S|·k + |O|`` per layer (+ 4·|O| per batch norm)."""
    values = 0
    for layer in spa_layers(model).values():
        active_out, active_in = int(layer.out_mask.sum()), int(layer.in_mask.sum())
        values += active_out * active_in * layer.weight[0, 0].numel()
        values += active_out if layer.bias is not None else 0
    if norms:
        values += sum(4 * int(mask.sum()) for mask in norm_channels(masks).values())
    return values


def fine_pruned_deflated_bytes(model: nn.Module) -> int:
    """The fine-pruned copy's values (as :func:`fine_pruned_values` counts them), deflated like a package's payload."""
    with torch.no_grad():
        blocks = []
        for layer in spa_layers(model).values():
            out_idx, in_idx = layer.out_mask.nonzero().flatten(), layer.in_mask.nonzero().flatten()
            blocks.append(layer.weight.index_select(0, out_idx).index_select(1, in_idx).flatten())
            if layer.bias is not None:
                blocks.append(layer.bias.index_select(0, out_idx))
        raw = torch.cat(blocks).cpu().numpy().tobytes()
    return len(zlib.compress(byte_planes(raw), 9))


def formula_values(model: nn.Module) -> int:
    """The count of docs/design.md (what is computed): ``r·(|O| + |S|) + |O|`` values per SPLoRA layer (``|O|`` only where there is a bias)."""
    values = 0
    for layer in spa_layers(model).values():
        active_out, active_in = int(layer.out_mask.sum()), int(layer.in_mask.sum())
        values += layer.rank * (active_out + active_in) + (active_out if layer.bias is not None else 0)
    return values


def norm_names(masks: Masks) -> list[str]:
    return list(norm_channels(masks))


# --------------------------------------------------------------------------- the suite


class TaskSwitchSuite:
    name = "task"

    def count_cases(self, config: RunConfig) -> int:
        return 2  # sizes, then the switch timing

    def run(self, config: RunConfig, progress: Progress) -> SuiteReport:
        shape = TASK_SHAPE
        report = SuiteReport(self.name, notes=[
            f"task: {shape}; every convolution keeps {format_keep(shape.keep)} of its input and output channels "
            "(--keep does not apply to this suite).",
        ])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(DATA_SEED)
            base = ResNet(shape)
        redraw_norms(base, torch.Generator().manual_seed(DATA_SEED))
        with tempfile.TemporaryDirectory(prefix="spa-task-bench-") as directory:
            progress.begin("task: package sizes")
            size_table, ratio = self._sizes(base, shape, directory)
            progress.end()
            report.tables.append(size_table)
            progress.begin("task: switching between two tasks, contenders interleaved")
            switch_table, load_ms = self._switch(base, shape, config, directory)
            progress.end()
            report.tables.append(switch_table)
        report.targets.append(QuantityTarget(
            "task package", shape.keep, f"package ÷ fine-pruned (rank {shape.rank})", "≤", SIZE_TARGET, ratio,
            unit="%", multiplier=100.0))
        load_value = load_ms if config.device.type == "cpu" else None
        report.targets.append(QuantityTarget(
            "task switch", shape.keep, f"median {LOAD_TASK} (rank {shape.rank})", "≤", LOAD_TARGET_MS, load_value,
            unit="ms"))
        if config.device.type != "cpu":
            report.targets_note = "The load-time target is a CPU target; it is not evaluated here."
        return report

    @staticmethod
    def _sizes(base: nn.Module, shape: NetworkShape, directory: str) -> tuple[Table, float]:
        dtype = str(next(base.parameters()).dtype).removeprefix("torch.")
        headers = ["rank", "stored per task", "package B", "uncompressed B", "formula values B", "fine-pruned B",
                   "fine-pruned deflated B", "package ÷ fine-pruned", "uncompressed ÷ fine-pruned",
                   "values ÷ fine-pruned", "package ÷ fine-pruned deflated"]
        rows, target_ratio = [], float("nan")
        for rank in SIZE_RANKS:
            model, masks = task_model(base, shape, rank, MASK_SEED)
            element = model.fc.weight.element_size()
            cases = [("masks + adapters + biases", (), False)]
            if rank == shape.rank:
                cases.append(("… + batch norms (the default package)", norm_names(masks), True))
            for what, task_specific, norms in cases:
                # The default package holds the trained batch norms by itself; without them is the SPA part only.
                written = save_task(model, os.path.join(directory, f"size-{rank}-{norms}.spa"), trained_state=norms)
                uncompressed = task_size(model, compress=False, trained_state=norms)
                fine = fine_pruned_values(model, masks, norms) * element
                design = formula_values(model) * element
                if norms:  # the batch norms' full state, as the package stores it
                    design += sum(sum(t.numel() * t.element_size() for t in model.get_submodule(n).state_dict().values())
                                  for n in task_specific)
                fine_deflated = fine_pruned_deflated_bytes(model) if not norms else None
                rows.append([str(rank), what, f"{written:,}", f"{uncompressed:,}", f"{design:,}", f"{fine:,}",
                             "" if fine_deflated is None else f"{fine_deflated:,}",
                             f"{100 * written / fine:.2f}%", f"{100 * uncompressed / fine:.2f}%",
                             f"{100 * design / fine:.2f}%",
                             "" if fine_deflated is None else f"{100 * written / fine_deflated:.2f}%"])
                if rank == shape.rank and not norms:
                    target_ratio = written / fine
        notes = [
            f"sizes in bytes, {dtype}; package = the file save_task writes (header, bit-packed masks, "
            "active adapter and bias entries, SHA-256), deflated with its byte planes (the default, lossless); "
            "uncompressed = the same with compress=False; formula values = r·(|O|+|S|)+|O| per layer "
            "(|O| only with a bias: the convolutions have none, the head has one), no masks or header; "
            "the uncompressed package's overhead over it is the header (names, shapes, offsets: ~0.5 kB per layer).",
            "fine-pruned = |O|·|S|·k + |O| per layer (bias only where the layer has one), no masks or header: "
            "the active block of every convolution and of the head; fine-pruned deflated = those values "
            "deflated by the package's codec (the base here is randomly initialised, as trained weights "
            "roughly are at the byte level). The target is package ÷ fine-pruned.",
            "… + batch norms: what save_task stores by default, which is what a user keeps per task: the package "
            "(and its values column) also holds every batch norm's full state (trained affine and running "
            "statistics); the first row is save_task(trained_state=False). The fine-pruned copy their weight, "
            "bias, running mean and variance on the active channels.",
        ]
        title = f"task package {shape.name} keep {format_keep(shape.keep)} ({dtype}) — stored per task: bytes"
        return Table(title, headers, rows, notes), target_ratio

    def _switch(self, base: nn.Module, shape: NetworkShape, config: RunConfig,
                directory: str) -> tuple[Table, float | None]:
        device, dtype = config.device, config.dtype
        tasks = [task_model(base, shape, shape.rank, MASK_SEED + index) for index in range(2)]
        images = torch.randn(CHECK_IMAGES, 3, shape.image_size, shape.image_size,
                             generator=torch.Generator().manual_seed(DATA_SEED))
        with torch.no_grad():
            want = [model(images) for model, _ in tasks]
        contenders: dict[str, Callable[[], None]] = {}

        # load_task: the packages, onto one converted copy of the base.
        shared = spa_kernels.convert(base, rank=shape.rank).eval()
        packages = [os.path.join(directory, f"task-{index}.spa") for index in range(2)]
        for (model, _), path in zip(tasks, packages, strict=True):
            save_task(model, path, trained_state=False)
        contenders[LOAD_TASK] = self._alternate(shared, packages, want, images, load_task, exact=True)

        # load_task + norms: the default packages, which hold the trained batch norms too.
        with_norms = spa_kernels.convert(base, rank=shape.rank).eval()
        norm_packages = [os.path.join(directory, f"task-norms-{index}.spa") for index in range(2)]
        for (model, _), path in zip(tasks, norm_packages, strict=True):
            save_task(model, path)  # the default: the trained batch norms are stored too
        contenders[LOAD_TASK_NORMS] = self._alternate(with_norms, norm_packages, want, images, load_task, exact=True)

        # state dict: the full-width trainable state (adapters, biases, masks) of each task.
        by_state = spa_kernels.convert(base, rank=shape.rank).eval()
        state_files = [os.path.join(directory, f"task-{index}.pt") for index in range(2)]
        for (model, _), path in zip(tasks, state_files, strict=True):
            torch.save(spa_state(model), path)
        contenders[STATE_DICT] = self._alternate(by_state, state_files, want, images, load_state_file, exact=True)

        # fine-pruned: a compacted network per task, switched by loading its weights.
        compact = [compacted_network(model, masks).eval() for model, masks in tasks]
        compact_files = [os.path.join(directory, f"fine-pruned-{index}.pt") for index in range(2)]
        for network, path in zip(compact, compact_files, strict=True):
            torch.save(network.state_dict(), path)
        by_fine = copy.deepcopy(compact[0])
        contenders[FINE_PRUNED] = self._alternate(by_fine, compact_files, want, images, load_state_file, exact=False)

        for model in (shared, with_norms, by_state, by_fine):
            model.to(device, dtype)
        times = measure_interleaved(contenders, device, config.budget)
        return self._switch_table(shape, dtype, times), times[LOAD_TASK].median_ms

    @staticmethod
    def _alternate(model: nn.Module, files: list[str], want: list[Tensor], images: Tensor,
                   load: Callable[[nn.Module, str], object], exact: bool) -> Callable[[], None]:
        """Check that loading each file gives that task's logits, then a callable switching alternately."""
        for path, logits in zip(files + files[:1], want + want[:1], strict=True):
            load(model, path)
            with torch.no_grad():
                got = model(images)
            if exact and not torch.equal(got, logits):
                raise ContenderMismatch(f"task: after loading {os.path.basename(path)} the logits differ from "
                                        "the task's own model")
            limit = tolerance(torch.float32) * 10 * max(logits.abs().max().item(), 1.0)
            if not exact and not (got - logits).abs().max().item() <= limit:
                raise ContenderMismatch(f"task: the fine-pruned network from {os.path.basename(path)} differs "
                                        "from the task's own model")
        turn = [0]

        def switch() -> None:
            turn[0] ^= 1
            load(model, files[turn[0]])

        return switch

    @staticmethod
    def _switch_table(shape: NetworkShape, dtype: torch.dtype, times: dict[str, Measurement]) -> Table:
        names = [LOAD_TASK, LOAD_TASK_NORMS, STATE_DICT, FINE_PRUNED]
        headers = ["keep", *names, f"{STATE_DICT} ÷ {LOAD_TASK}", f"{FINE_PRUNED} ÷ {LOAD_TASK}"]
        load = times[LOAD_TASK].median_ms
        row = [format_keep(shape.keep), *(str(times[name]) for name in names),
               format_ratio(times[STATE_DICT].median_ms / load), format_ratio(times[FINE_PRUNED].median_ms / load)]
        notes = [
            "switch = read one task's file and apply it to a loaded base; the two tasks alternate.",
            f"{LOAD_TASK}: the task package; {LOAD_TASK_NORMS}: the package holding the batch norms too; "
            f"{STATE_DICT}: torch.load + load_state_dict of the full-width "
            f"adapters, biases and masks; {FINE_PRUNED}: torch.load + load_state_dict of a compacted "
            "network's weights (batch norms included).",
        ]
        dtype_name = str(dtype).removeprefix("torch.")
        title = (f"task switch {shape.name} rank {shape.rank} keep {format_keep(shape.keep)} ({dtype_name}) — "
                 "median ms (p20–p80)")
        return Table(title, headers, [row], notes)


def load_state_file(model: nn.Module, path: str) -> None:
    """``torch.load`` (tensors only) + ``load_state_dict``: the usual way to load weights from a file."""
    state = torch.load(path, map_location=next(model.parameters()).device, weights_only=True)
    model.load_state_dict(state, strict=False)


SUITE = TaskSwitchSuite()
