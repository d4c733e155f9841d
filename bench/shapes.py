"""The standard benchmark shapes, keep ratios and masks of docs/design.md (benchmarks), in one place.

Every suite takes its problem sizes from here, so a table from one machine can be
compared with a table from another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

KEEP_RATIOS = (1.0, 0.5, 0.3, 0.1)
"""Fraction of channels kept, the same for inputs and outputs."""

CPU_THREADS = 2
MASK_SEED = 0
DATA_SEED = 1

DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}
"""Compute dtype per device type: fp32 on the CPU, bf16 on GPUs."""


@dataclass(frozen=True)
class LinearShape:
    """``x`` is ``tokens × in_features``; the layer maps it to ``out_features``."""

    name: str
    tokens: int
    in_features: int
    out_features: int
    rank: int

    def __str__(self) -> str:
        return f"x {self.tokens} × {self.in_features} → {self.out_features}, rank {self.rank}"


@dataclass(frozen=True)
class Conv2dShape:
    """``x`` is ``batch × in_channels × height × width``; square odd kernel, stride 1, same padding."""

    name: str
    batch: int
    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel_size: int
    rank: int

    @property
    def padding(self) -> int:
        return self.kernel_size // 2

    def __str__(self) -> str:
        return (
            f"x {self.batch} × {self.in_channels} × {self.height} × {self.width} → {self.out_channels}, "
            f"{self.kernel_size}×{self.kernel_size}, rank {self.rank}"
        )


@dataclass(frozen=True)
class NetworkShape:
    """A ResNet of BasicBlocks on ``batch × 3 × image_size × image_size`` images.

    Stem: 7×7 stride-2 convolution, batch norm, ReLU, 3×3 stride-2 max pool.  Then one
    stage per entry of ``stage_channels`` with ``blocks_per_stage`` BasicBlocks each
    (stride 2 and a 1×1 downsample convolution where a stage begins, except the first),
    global average pooling and a linear head with ``classes`` outputs.  Every
    convolution and the head get a rank-``rank`` adapter; ``keep`` of the channels of
    every convolution stay active.
    """

    name: str
    batch: int
    image_size: int
    classes: int
    stage_channels: tuple[int, ...]
    blocks_per_stage: int
    rank: int
    keep: float

    def __str__(self) -> str:
        channels = "-".join(str(c) for c in self.stage_channels)
        return (
            f"{self.name}: batch {self.batch} × 3 × {self.image_size} × {self.image_size}, "
            f"stages {channels} × {self.blocks_per_stage} blocks, {self.classes} classes, "
            f"rank {self.rank}, keep {format_keep(self.keep)}"
        )


@dataclass(frozen=True)
class BottleneckShape:
    """A bottleneck ResNet-50 on ``batch × 3 × image_size × image_size`` images, rank-``rank`` adapters."""

    name: str
    batch: int
    image_size: int
    classes: int
    rank: int

    def __str__(self) -> str:
        return (f"{self.name}: batch {self.batch} × 3 × {self.image_size} × {self.image_size}, "
                f"{self.classes} classes, rank {self.rank}")


# A ViT-B MLP expansion at batch 8 (8 images × 197 tokens).
VIT_B_MLP = LinearShape("vit-b-mlp", tokens=1576, in_features=768, out_features=3072, rank=16)
# Large enough to keep a datacentre GPU busy; GPU runs only.
LARGE_LINEAR = LinearShape("large", tokens=8192, in_features=4096, out_features=4096, rank=16)
# A ResNet-50 stage-3 convolution at batch 32 (for the conv suite).
RESNET_CONV3X3 = Conv2dShape(
    "resnet-3x3", batch=32, in_channels=256, out_channels=256, height=14, width=14, kernel_size=3, rank=16
)

# ResNet-18 on 56 × 56 images: every layer kind of a CNN, small enough for 2 CPU cores.
RESNET18_56 = NetworkShape(
    "resnet-18", batch=32, image_size=56, classes=100, stage_channels=(64, 128, 256, 512),
    blocks_per_stage=2, rank=16, keep=0.5,
)

# Hugging Face's ResNet-50 at a quarter of the ImageNet pixels: a whole suite in about three minutes on 2 cores.
RESNET50_112 = BottleneckShape("ResNet-50 (Hugging Face, bottleneck 3-4-6-3)", batch=8, image_size=112, classes=10,
                               rank=8)

LINEAR_SHAPES = {"cpu": (VIT_B_MLP,), "cuda": (VIT_B_MLP, LARGE_LINEAR)}
CONV2D_SHAPES = {"cpu": (RESNET_CONV3X3,), "cuda": (RESNET_CONV3X3,)}
NETWORK_SHAPES = {"cpu": (RESNET18_56,), "cuda": (RESNET18_56,)}


def format_keep(keep: float) -> str:
    """``1.0``, ``0.5``, ``0.25``: as short as exact, with at least one decimal."""
    text = f"{keep:g}"
    return text if "." in text else f"{text}.0"


def active_count(channels: int, keep: float) -> int:
    """Channels kept at ratio ``keep``: rounded, at least one while ``keep > 0``."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {keep}")
    return max(1, min(channels, round(keep * channels)))


def draw_active_channels(channels: int, keep: float, generator: torch.Generator) -> Tensor:
    """Sorted int64 indices of ``active_count(channels, keep)`` channels drawn at random."""
    count = active_count(channels, keep)
    return torch.randperm(channels, generator=generator)[:count].sort().values


def channel_indices(in_channels: int, out_channels: int, keep: float, seed: int = MASK_SEED) -> tuple[Tensor, Tensor]:
    """Active input and output channels (CPU int64) for ``keep``; the same on every run and machine."""
    generator = torch.Generator().manual_seed(seed)
    in_idx = draw_active_channels(in_channels, keep, generator)
    out_idx = draw_active_channels(out_channels, keep, generator)
    return in_idx, out_idx
