"""The ``cpu`` backend: fused C++ kernels from ``csrc/cpu`` (OpenMP, AVX-512/AVX2).

Registered only when the compiled extension ``spa_kernels._C`` imports; the
package works without it (auto selection then falls back to the reference).
``linear.py`` and ``conv.py`` are the Python side of the extension's ops.
"""

from __future__ import annotations

from ... import _extension
from ..._validation import SUPPORTED_DTYPES
from .. import Backend, Capabilities, register_backend
from . import conv, linear, splopa
from .conv import splora_conv_backward, splora_conv_forward, sppara_conv_backward, sppara_conv_forward
from .linear import splora_linear_backward, splora_linear_forward
from .splopa import splopa_linear_backward, splopa_linear_forward

name = "cpu"
CAPABILITIES = Capabilities(devices=("cpu",), dtypes=SUPPORTED_DTYPES, compact_activations=True)

BUILT = _extension.BUILT
BUILD_ERROR = _extension.BUILD_ERROR


def isa() -> str:
    """Instruction set the kernels dispatch to: ``"avx512"``, ``"avx2"`` or ``"generic"``."""
    return _extension.extension.cpu_isa() if BUILT else "unavailable"


def set_isa(isa_name: str) -> None:
    """Force an instruction set (for tests); only ones this CPU supports are accepted."""
    if not BUILT:
        raise RuntimeError(f"the cpu backend is not built: {BUILD_ERROR}")
    _extension.extension.set_cpu_isa(isa_name)


def supported_isas() -> list[str]:
    return list(_extension.extension.supported_cpu_isas()) if BUILT else []


def small_problem_limit() -> int | None:
    """Multiply-adds of a call's main product at or below which the kernels run plain loops (None without the build).

    Such calls skip the GEMM engine, whose fixed cost would exceed their arithmetic.
    """
    return _extension.extension.small_problem_limit() if BUILT else None


def set_small_problem_limit(macs: int) -> None:
    """Set :func:`small_problem_limit` (0: the GEMM engine always), e.g. for tests of either path."""
    if not BUILT:
        raise RuntimeError(f"the cpu backend is not built: {BUILD_ERROR}")
    _extension.extension.set_small_problem_limit(int(macs))


def max_threads() -> int | None:
    """OpenMP threads a kernel call may use (None without the build)."""
    return _extension.extension.max_threads() if BUILT else None


def extension_path() -> str | None:
    """File the compiled extension was loaded from (None without the build)."""
    return _extension.extension.__file__ if BUILT else None


if BUILT:
    register_backend(Backend(name, CAPABILITIES, kernels=(linear, conv, splopa)))

__all__ = [
    "BUILD_ERROR",
    "BUILT",
    "CAPABILITIES",
    "extension_path",
    "isa",
    "max_threads",
    "name",
    "set_isa",
    "set_small_problem_limit",
    "small_problem_limit",
    "splopa_linear_backward",
    "splopa_linear_forward",
    "splora_conv_backward",
    "splora_conv_forward",
    "splora_linear_backward",
    "splora_linear_forward",
    "sppara_conv_backward",
    "sppara_conv_forward",
    "supported_isas",
]
