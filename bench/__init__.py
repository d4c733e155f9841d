"""Benchmarks of spa_kernels against the anchors that docs/design.md (benchmarks) names.

``python -m bench`` (or ``make bench``) runs every registered suite; see
``bench/README.md`` for the options and the meaning of each column.

A suite is an object with a ``name``, ``count_cases(config)`` (to size the
progress bar) and ``run(config, progress)`` returning a
:class:`bench.report.SuiteReport`.  ``bench/__main__.py`` holds the registry;
adding a benchmark means writing one such object and
listing it there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .report import SuiteReport
from .timing import Budget


@dataclass(frozen=True)
class RunConfig:
    device: torch.device
    dtype: torch.dtype
    keeps: tuple[float, ...]
    budget: Budget
    compiled: str = "auto"  # torch.compile rows of the network suites: "auto" (within their time budget), "yes", "no"


class Progress(Protocol):
    def begin(self, description: str) -> None: ...

    def end(self) -> None: ...


class Suite(Protocol):
    name: str

    def count_cases(self, config: RunConfig) -> int: ...

    def run(self, config: RunConfig, progress: Progress) -> SuiteReport: ...
