"""What every example shares: the digits data, a small residual CNN, training and evaluation.

The data is scikit-learn's 8×8 digits (1,797 images shipped with the package), so the
examples download nothing.  Pretraining and adaptation use disjoint halves of the classes:
a base network learns digits 0–4, then a task adapts it to digits 5–9, which is the
transfer setting SPA was made for.

The network is a stem convolution, a sequence of residual blocks of one width (so any
prefix of the blocks can feed the head, which layer-wise truncation needs), global
average pooling and a linear head.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

import spa_kernels

PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
TASK_CLASSES = (5, 6, 7, 8, 9)


@dataclass(frozen=True)
class Split:
    """Train and test tensors of some classes; labels renumbered 0..len(classes)-1."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def classes(self) -> int:
        return int(self.y_train.max()) + 1


def digits_split(classes: tuple[int, ...], seed: int = 0, test_fraction: float = 0.3) -> Split:
    """The digits of ``classes`` as N × 1 × 8 × 8 float tensors in [0, 1], split at random by ``seed``."""
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    chosen = torch.isin(labels, torch.tensor(classes))
    images, labels = images[chosen], labels[chosen]
    renumber = torch.full((10,), -1, dtype=torch.long)
    renumber[torch.tensor(classes)] = torch.arange(len(classes))
    labels = renumber[labels]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test = int(len(labels) * test_fraction)
    test_idx, train_idx = order[:test], order[test:]
    return Split(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx])


class Block(nn.Module):
    """conv-bn-relu-conv-bn plus the input, then relu (a ResNet BasicBlock of constant width)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + x)


class DigitsNet(nn.Module):
    """stem (1 → width) → ``blocks`` residual blocks → global average pool → linear head."""

    def __init__(self, classes: int, width: int = 32, blocks: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(*(Block(width) for _ in range(blocks)))
        self.head = nn.Linear(width, classes)

    def features(self, x: Tensor) -> Tensor:
        return self.blocks(F.relu(self.stem_bn(self.stem(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def train(model: nn.Module, split: Split, epochs: int, lr: float = 3e-3, batch: int = 64, seed: int = 0) -> None:
    """Adam on the trainable parameters of ``model``, cross-entropy, shuffled mini-batches."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(split.y_train), generator=generator)
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            optimiser.zero_grad(set_to_none=True)
            F.cross_entropy(model(split.x_train[idx]), split.y_train[idx]).backward()
            optimiser.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, split: Split) -> float:
    """Test accuracy of ``model`` on ``split`` in percent (the model is left in eval mode)."""
    model.eval()
    predicted = model(split.x_test).argmax(dim=1)
    return 100.0 * (predicted == split.y_test).float().mean().item()


def pretrained_base(seed: int = 0, width: int = 32, blocks: int = 4, epochs: int = 15) -> DigitsNet:
    """A DigitsNet trained on the pretraining half of the classes (seeded; seconds on one idle core)."""
    torch.manual_seed(seed)
    base = DigitsNet(len(PRETRAIN_CLASSES), width=width, blocks=blocks)
    train(base, digits_split(PRETRAIN_CLASSES, seed=seed), epochs=epochs, seed=seed)
    return base


def with_new_head(base: DigitsNet, classes: int, seed: int = 0) -> DigitsNet:
    """A copy of ``base`` whose head is freshly initialised for ``classes`` outputs."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    model.head = nn.Linear(model.head.in_features, classes)
    return model


def splora_task_model(base: DigitsNet, classes: int, rank: int = 4, seed: int = 0) -> DigitsNet:
    """``base`` with SPLoRA convolutions (frozen weights, rank-``rank`` adapters) and a new plain head.

    The head and the batch norms stay ordinary trainable layers: they are task-specific
    and go into the task package whole.
    """
    model = spa_kernels.convert(with_new_head(base, classes, seed), rank=rank)
    torch.manual_seed(seed)
    model.head = nn.Linear(model.head.in_features, classes)
    return model
