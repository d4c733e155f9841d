"""Backend policy: which implementation runs an op.

A backend is a module-like object with ``is_available(device_type, dtype)`` and
the kernel entry points of each op (``splora_linear_forward``,
``splora_linear_backward``).  Backends register themselves here on import; the
functional layer asks :func:`resolve` for one before calling an op.

Selection order for ``backend=None``/``"auto"``: the ``use_backend`` context,
then ``SPA_KERNELS_BACKEND``, then the fastest available backend for the device
(``AUTO_PREFERENCE``).  An explicitly named backend that cannot run raises; auto
falls back silently and says why in the debug log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Protocol

import torch

logger = logging.getLogger("spa_kernels")

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")
ENV_VARIABLE = "SPA_KERNELS_BACKEND"

# Fastest first.  The Triton interpreter is far too slow to be chosen by auto on
# the CPU, so "triton" is listed for CUDA devices only.  "cuda" joins the list
# (ahead of "triton") once it has passed its tests on a GPU; until then it runs
# only when asked for by name.
AUTO_PREFERENCE = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "reference"),
}


class Backend(Protocol):
    name: str

    def is_available(self, device_type: str, dtype: torch.dtype) -> bool: ...


_REGISTRY: dict[str, Backend] = {}
# Per-thread stack of use_backend() choices.  threading.local rather than a
# ContextVar because torch.compile can trace (and guard on) its lookup.
_LOCAL = threading.local()


def _forced_stack() -> list[str]:
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    return stack


def register_backend(backend: Backend) -> None:
    """Make ``backend`` selectable under ``backend.name``."""
    if backend.name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend name {backend.name!r}")
    _REGISTRY[backend.name] = backend


def _check_name(name: str, argument: str = "backend") -> str:
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a str or None, got {type(name).__name__}")
    if name not in BACKEND_NAMES and name != "auto":
        raise ValueError(
            f"{argument} must be one of {('auto',) + BACKEND_NAMES}, got {name!r}"
        )
    return name


def backends(device: str | torch.device = "cpu") -> list[str]:
    """Names of the backends that can run on ``device`` (a device or its type)."""
    device_type = torch.device(device).type
    return [
        name
        for name in BACKEND_NAMES
        if name in _REGISTRY and _REGISTRY[name].is_available(device_type, None)
    ]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every op in the ``with`` block on backend ``name`` (or ``"auto"``)."""
    stack = _forced_stack()
    stack.append(_check_name(name))
    try:
        yield
    finally:
        stack.pop()


def _requested(backend: str | None) -> str:
    if backend is not None and backend != "auto":
        return _check_name(backend)
    forced = getattr(_LOCAL, "stack", ())
    if forced:
        return forced[-1]
    from_env = os.environ.get(ENV_VARIABLE)
    if from_env:
        return _check_name(from_env.strip().lower(), ENV_VARIABLE)
    return "auto"  # backend is None or "auto" here


def _implements(impl: Backend, op: str) -> bool:
    return hasattr(impl, f"{op}_forward") and hasattr(impl, f"{op}_backward")


def resolve(
    backend: str | None, device: torch.device, dtype: torch.dtype, op: str = "splora_linear"
) -> Backend:
    """The backend that runs ``op`` on tensors of ``device`` and ``dtype``.

    A backend runs an op when it is available for the device and dtype and
    implements ``<op>_forward`` and ``<op>_backward``.
    """
    name = _requested(backend)
    if name != "auto":
        impl = _REGISTRY.get(name)
        if impl is None or not impl.is_available(device.type, dtype):
            raise ValueError(
                f"backend={name!r} cannot run on {device.type} tensors of {dtype}; "
                f"usable here: {backends(device)}"
                + (" (the compiled extension is not built)" if name == "cpu" and impl is None else "")
            )
        if not _implements(impl, op):
            raise ValueError(f"backend={name!r} does not implement {op}")
        return impl
    for candidate in AUTO_PREFERENCE.get(device.type, ("reference",)):
        impl = _REGISTRY.get(candidate)
        if impl is not None and impl.is_available(device.type, dtype) and _implements(impl, op):
            return impl
        if not torch.compiler.is_compiling():  # Dynamo cannot trace logging calls
            logger.debug("auto backend: %s cannot run %s for %s/%s", candidate, op, device.type, dtype)
    return _REGISTRY["reference"]


def get(name: str) -> Backend:
    """The registered backend called ``name`` (used by the op layer)."""
    return _REGISTRY[name]
