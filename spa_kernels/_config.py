"""What a bug report needs: versions, the compiled extension, backends per device, the CPU set-up.

``show_config()`` prints it and ``python -m spa_kernels`` runs it.  Every probe
is guarded: a broken Triton, a missing extension or no GPU is reported as such,
never raised, since this is what a user runs when something does not work.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

import torch

from .backend import backends, cpu
from .backend import triton as triton_backend

# Variables that change which kernels run or how; printed when set.
ENVIRONMENT_VARIABLES = (
    "SPA_KERNELS_BACKEND",
    "SPA_KERNELS_CPU_ISA",
    "TRITON_INTERPRET",
    "OMP_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
)


def _distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _package_version() -> str:
    from . import __version__

    return __version__


def _triton_line() -> str:
    version = _distribution_version("triton")
    if triton_backend.IMPORTED:
        mode = "in the interpreter" if triton_backend.INTERPRETED else "compiled for GPUs"
        return f"{version} (the kernels import; they run {mode})"
    if version == "not installed":
        return version
    return f"{version} (the triton backend cannot import: {triton_backend.IMPORT_ERROR})"


def _numpy_version() -> str:
    try:
        import numpy
    except ImportError as error:
        return f"not importable ({error})"
    return numpy.__version__


def _torch_build() -> str:
    parts = [f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"]
    if getattr(torch.version, "hip", None):
        parts.append(f"HIP {torch.version.hip}")
    parts.append(f"debug={torch.version.debug}")
    return ", ".join(parts)


def _extension_lines() -> list[str]:
    if not cpu.BUILT:
        return [f"  built:            no ({cpu.BUILD_ERROR})"]
    lines = [f"  built:            yes ({cpu.extension_path()})"]
    lines.append(f"  CPU ISA chosen:   {cpu.isa()}")
    lines.append(f"  ISAs supported:   {', '.join(cpu.supported_isas())}")
    lines.append(f"  OpenMP threads:   {cpu.max_threads()} (kernels), {torch.get_num_threads()} (torch)")
    return lines


def _device_lines() -> list[str]:
    lines = [f"  cpu:   {', '.join(backends('cpu'))}"]
    try:
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as error:  # a driver problem is worth reporting, not raising
        lines.append(f"  cuda:  unavailable ({type(error).__name__}: {error})")
        return lines
    if cuda_count == 0:
        lines.append("  cuda:  no device visible")
        return lines
    names = ", ".join(backends("cuda"))
    for index in range(cuda_count):
        capability = ".".join(str(v) for v in torch.cuda.get_device_capability(index))
        lines.append(f"  cuda:{index}: {names}  [{torch.cuda.get_device_name(index)}, sm {capability}]")
    return lines


def config_report() -> str:
    """The text that :func:`show_config` prints."""
    lines = [
        "spa_kernels configuration",
        f"  spa_kernels:      {_package_version()} ({os.path.dirname(os.path.abspath(__file__))})",
        f"  Python:           {platform.python_version()} ({sys.executable})",
        f"  platform:         {platform.platform()} {platform.machine()}",
        f"  torch:            {torch.__version__} ({_torch_build()})",
        f"  Triton:           {_triton_line()}",
        f"  NumPy:            {_numpy_version()}",
        "compiled cpu extension (spa_kernels._C)",
        *_extension_lines(),
        "backends usable per device (auto picks the first that fits the dtype; reference runs anywhere)",
        *_device_lines(),
    ]
    set_variables = [f"  {name}={os.environ[name]}" for name in ENVIRONMENT_VARIABLES if name in os.environ]
    lines.append("environment")
    lines.extend(set_variables or ["  (none of " + ", ".join(ENVIRONMENT_VARIABLES) + " is set)"])
    return "\n".join(lines)


def show_config() -> None:
    """Print versions, the extension's build state, backends per device, CPU ISA and threads.

    Paste its output into a bug report; ``python -m spa_kernels`` prints the same.
    """
    print(config_report())
