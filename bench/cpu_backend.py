"""What the bench says about the spa_kernels cpu backend: built or not, why not, which ISA.

The public API names the backends that run (``spa_kernels.backends``) but not why
one is missing nor which instruction set the C++ kernels dispatch to, so this is the
one place the bench reads the backend's own module. Its location is looked up rather
than imported, so a move of the backend inside the package costs a line here, and a
module that cannot be found reads as "unknown" instead of stopping the run.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Where the cpu backend's module lives.
MODULE_PATHS = ("spa_kernels.backend.cpu",)


def _module() -> ModuleType | None:
    for path in MODULE_PATHS:
        try:
            module = importlib.import_module(path)
        except ImportError:
            continue
        if hasattr(module, "BUILT"):
            return module
    return None


def built() -> bool:
    module = _module()
    return bool(module is not None and module.BUILT)


def build_error() -> str | None:
    """Why the extension did not load, or ``None`` when it did (or when that cannot be told)."""
    module = _module()
    return None if module is None else getattr(module, "BUILD_ERROR", None)


def isa() -> str:
    """The instruction set the cpu kernels dispatch to, e.g. ``"avx512"``."""
    module = _module()
    if module is None or not hasattr(module, "isa"):
        return "unknown"
    return module.isa()
