"""A ResNet of BasicBlocks (ResNet-18 by default), its channel masks, and its compacted twin.

Written here rather than taken from torchvision so the benchmark needs nothing beyond
torch.  Module names follow torchvision (``conv1``, ``layer2.0.downsample.0``, ``fc``),
so a reader can map the masks onto the familiar network.

Masks (:func:`draw_masks`) are consistent along every connection, so that pruning a
channel where a layer writes it also prunes it where the next layer reads it:

* one *residual* mask per stage: the outputs of the stem (for stage 1), of every
  block's second convolution and of the stage's downsample convolution, and the inputs
  of the convolutions that read the residual stream;
* one *inner* mask per block: the outputs of its first convolution and the inputs of
  its second one;
* the stem reads every image channel; the head reads the last stage's residual channels
  and writes every class.

With such masks the network can also be built physically smaller
(:func:`compacted_network`): every layer keeps only its active channels, which is the
practical limit of masked training.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conv_anchors import centre_tap_conv
from .shapes import NetworkShape, active_count

Masks = dict[str, tuple[Tensor, Tensor]]
"""Layer name -> (bool input mask, bool output mask), for every convolution and the head."""


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + identity)


class ResNet(nn.Module):
    def __init__(self, shape: NetworkShape):
        super().__init__()
        first = shape.stage_channels[0]
        self.conv1 = nn.Conv2d(3, first, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(first)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = first
        for stage, channels in enumerate(shape.stage_channels, start=1):
            blocks = []
            for block in range(shape.blocks_per_stage):
                stride = 2 if stage > 1 and block == 0 else 1
                blocks.append(BasicBlock(in_channels, channels, stride))
                in_channels = channels
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.stages = len(shape.stage_channels)
        self.fc = nn.Linear(in_channels, shape.classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for stage in range(1, self.stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def draw_masks(shape: NetworkShape, generator: torch.Generator) -> Masks:
    """Random masks keeping ``shape.keep`` of the channels of every convolution (see the module doc)."""

    def draw(channels: int) -> Tensor:
        mask = torch.zeros(channels, dtype=torch.bool)
        mask[torch.randperm(channels, generator=generator)[:active_count(channels, shape.keep)]] = True
        return mask

    residual = [draw(channels) for channels in shape.stage_channels]
    masks: Masks = {"conv1": (torch.ones(3, dtype=torch.bool), residual[0])}
    previous = residual[0]
    for stage, channels in enumerate(shape.stage_channels, start=1):
        stream = residual[stage - 1]
        for block in range(shape.blocks_per_stage):
            name = f"layer{stage}.{block}"
            inner = draw(channels)
            masks[f"{name}.conv1"] = (previous, inner)
            masks[f"{name}.conv2"] = (inner, stream)
            if stage > 1 and block == 0:
                masks[f"{name}.downsample.0"] = (previous, stream)
            previous = stream
    masks["fc"] = (previous, torch.ones(shape.classes, dtype=torch.bool))
    return masks


def norm_channels(masks: Masks) -> dict[str, Tensor]:
    """Batch-norm name -> the output mask of the convolution it normalises."""
    norms = {}
    for name, (_, out_mask) in masks.items():
        if name == "fc":
            continue
        if name.endswith("downsample.0"):
            norms[name.removesuffix("0") + "1"] = out_mask
        else:
            prefix, _, conv = name.rpartition(".")
            norms[(prefix + "." if prefix else "") + conv.replace("conv", "bn")] = out_mask
    return norms


class CompactedSPLoRAConv2d(nn.Module):
    """A convolution over the active channels only, its adapter as a parallel 1×1 convolution.

    ``conv(x_S, W_OS) + conv1×1(conv1×1(x_S, A_S), B_O)`` on the centre-tap grid: what
    a masked SPLoRA convolution computes, on tensors that only hold the active channels.
    """

    def __init__(self, layer: nn.Conv2d, in_idx: Tensor, out_idx: Tensor):
        super().__init__()
        weight = layer.weight.detach()
        self.register_buffer("weight", weight[out_idx][:, in_idx].clone())
        rows, cols = layer.adapter.rows.detach(), layer.adapter.cols.detach()
        self.lora_a = nn.Parameter(rows[0][:, in_idx].clone())
        self.lora_b = nn.Parameter(cols[0][out_idx].clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach()[out_idx].clone())
        self.stride, self.padding, self.dilation = layer.stride[0], layer.padding[0], layer.dilation[0]
        self.kernel_size = layer.kernel_size[0]

    def forward(self, x: Tensor) -> Tensor:
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        return y + centre_tap_conv(x, self.lora_a, self.lora_b, kernel_size=self.kernel_size, stride=self.stride,
                                   padding=self.padding, dilation=self.dilation)


class CompactedSPLoRALinear(nn.Module):
    """``x_S W_OSᵀ + b_O + (x_S A_Sᵀ) B_Oᵀ`` on tensors that hold the active channels only."""

    def __init__(self, layer: nn.Linear, in_idx: Tensor, out_idx: Tensor):
        super().__init__()
        self.register_buffer("weight", layer.weight.detach()[out_idx][:, in_idx].clone())
        self.lora_a = nn.Parameter(layer.adapter.rows.detach()[0][:, in_idx].clone())
        self.lora_b = nn.Parameter(layer.adapter.cols.detach()[0][out_idx].clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach()[out_idx].clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_a), self.lora_b)


def compacted_norm(norm: nn.BatchNorm2d, idx: Tensor) -> nn.BatchNorm2d:
    compact = nn.BatchNorm2d(idx.numel(), eps=norm.eps, momentum=norm.momentum).to(norm.weight)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(compact, name).copy_(getattr(norm, name)[idx])
    return compact.train(norm.training)


def compacted_network(adapted: ResNet, masks: Masks) -> ResNet:
    """A physically smaller copy of ``adapted`` (whose layers hold ``adapter.rows``/``cols``).

    Every convolution, batch norm and the head keep only the channels that ``masks``
    leave active; the adapters and trainable parameters are copied, the frozen weights
    gathered.  The copy computes the active logits of the masked network.
    """
    compact = copy.deepcopy(adapted)
    device = next(adapted.parameters()).device

    def idx(mask: Tensor) -> Tensor:
        return mask.nonzero().flatten().to(device)

    for name, (in_mask, out_mask) in masks.items():
        layer = adapted.get_submodule(name)
        if name == "fc":
            replacement = CompactedSPLoRALinear(layer, idx(in_mask), idx(out_mask))
        else:
            replacement = CompactedSPLoRAConv2d(layer, idx(in_mask), idx(out_mask))
        _set_submodule(compact, name, replacement)
    for name, mask in norm_channels(masks).items():
        _set_submodule(compact, name, compacted_norm(adapted.get_submodule(name), idx(mask)))
    return compact


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def compacted_gradients(compact: ResNet, masks: Masks, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """The gradients of ``compact``'s trainable parameters, scattered to the full-width shapes in ``like``.

    Keys are the parameter names of the masked network (``layer1.0.conv1.adapter.rows`` …);
    pruned entries are zero, as they are in the masked network's gradients.
    """
    device = next(compact.parameters()).device

    def idx(mask: Tensor) -> Tensor:
        return mask.nonzero().flatten().to(device)

    grads: dict[str, Tensor] = {}

    def scatter(name: str, value: Tensor | None, *index: Tensor | slice) -> None:
        full = torch.zeros_like(like[name])
        if value is not None:
            full[index] = value
        grads[name] = full

    for name, (in_mask, out_mask) in masks.items():
        layer = compact.get_submodule(name)
        s, o = idx(in_mask), idx(out_mask)
        scatter(f"{name}.adapter.rows", layer.lora_a.grad, 0, slice(None), s)
        scatter(f"{name}.adapter.cols", layer.lora_b.grad, 0, o)
        if layer.bias is not None:
            scatter(f"{name}.bias", layer.bias.grad, o)
    for name, mask in norm_channels(masks).items():
        norm = compact.get_submodule(name)
        scatter(f"{name}.weight", norm.weight.grad, idx(mask))
        scatter(f"{name}.bias", norm.bias.grad, idx(mask))
    return grads
