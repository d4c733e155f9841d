"""Small models the pruning tests share: an MLP and a residual CNN with batch norm.

The residual CNN has every coupling a pruner must respect: a residual addition
(``block`` adds its output to its input), a 1×1 projection shortcut where the
width changes (``down``), batch norms after convolutions, and a flatten into a
linear head.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TinyMLP(nn.Module):
    def __init__(self, features: int = 12, hidden: int = 16, classes: int = 5):
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


class ResidualBlock(nn.Module):
    """conv-bn-relu-conv-bn plus the input (or its 1×1 projection), then relu."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResidualCNN(nn.Module):
    """stem (3→8) → block (8→8, identity shortcut) → down (8→16, stride 2) → pool → head."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.block = ResidualBlock(8, 8)
        self.down = ResidualBlock(8, 16, stride=2)
        self.head = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.down(self.block(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def residual_cnn_input(batch: int = 2, size: int = 8) -> Tensor:
    return torch.randn(batch, 3, size, size)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The models here are tiny: threads would only wait on each other (and on a busy machine, a lot)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
