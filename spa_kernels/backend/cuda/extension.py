"""The CUDA extension ``spa_kernels._C_cuda``, or why it is missing (built only where torch has CUDA)."""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch
from torch import Tensor

logger = logging.getLogger("spa_kernels")

try:
    extension: ModuleType | None = importlib.import_module("spa_kernels._C_cuda")
    BUILD_ERROR: str | None = None
except ImportError as error:  # the package must import without it
    extension = None
    BUILD_ERROR = str(error)
    logger.debug("spa_kernels._C_cuda is not available, cuda backend disabled: %s", error)

BUILT = extension is not None


def kernels() -> ModuleType:
    if extension is None:
        raise RuntimeError(f"the cuda backend is not built: {BUILD_ERROR}")
    return extension


def index_list(idx: Tensor | None) -> Tensor | None:
    """The kernels read int32 lists (channel counts are checked to fit)."""
    if idx is None:
        return None
    return idx.contiguous() if idx.dtype == torch.int32 else idx.to(torch.int32).contiguous()


def only_requested(grads, requested) -> tuple:
    return tuple(g if want else None for g, want in zip(grads, requested, strict=True))
