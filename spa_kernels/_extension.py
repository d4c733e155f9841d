"""The compiled extension ``spa_kernels._C``, loaded in one neutral place.

The cpu backend takes its kernels from it, and the argument checks take its
reader of index lists; neither imports the other.  The package must import
without a build, so a missing extension is logged (debug) and left as ``None``.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

logger = logging.getLogger("spa_kernels")

EXTENSION_NAME = f"{__package__}._C"

try:
    # Importing it registers its kernels as torch.ops.spa_kernels_cpu.*.
    extension: ModuleType | None = importlib.import_module(EXTENSION_NAME)
    BUILD_ERROR: str | None = None
except ImportError as error:
    extension = None
    BUILD_ERROR = str(error)
    logger.debug("%s is not available, cpu backend disabled: %s", EXTENSION_NAME, error)

BUILT = extension is not None

# (smallest, largest, strictly increasing) of a non-empty 1-D CPU index list;
# None where the extension is not built.
index_bounds = getattr(extension, "index_bounds", None)
