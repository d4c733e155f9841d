"""Backend policy: which implementation runs an op.

A backend is a :class:`Backend`: a name, its :class:`Capabilities` (device
types, dtypes, grouped convolutions) stated once as data, an optional readiness
test for what only run time can tell (a built extension, the Triton interpreter
switch), and the files holding its kernels, one per op family.  A file implements
an op ``<op>`` by defining ``<op>_forward`` and ``<op>_backward``.  Each backend
package registers itself on import with one call::

    register_backend(Backend("cpu", CAPABILITIES, kernels=(linear, conv), ready=...))

The functional layer asks :func:`resolve` for a backend before calling an op,
and the op layer calls :func:`check_runs` and :func:`kernel`: capabilities are
checked here and nowhere else.

Selection order for ``backend=None``/``"auto"``: the ``use_backend`` context,
then ``SPA_KERNELS_BACKEND``, then the fastest available backend for the device
(``AUTO_PREFERENCE``).  An explicitly named backend that cannot run raises; auto
falls back silently and says why in the debug log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterator
from types import ModuleType

import torch

logger = logging.getLogger("spa_kernels")

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")
ENV_VARIABLE = "SPA_KERNELS_BACKEND"

# Fastest first.  The Triton interpreter is far too slow to be chosen by auto on
# the CPU, so "triton" is listed for CUDA devices only.  "cuda" is a valid name
# but joins this list only once its kernels have passed on a GPU.
AUTO_PREFERENCE = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "reference"),
}


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backend can run, declared once per backend.

    ``devices``: device types its kernels run on (``None``: any device).
    ``dtypes``: floating dtypes of its operands.
    ``grouped_conv``: whether it runs convolutions with ``groups > 1``.
    ``compact_activations``: whether its kernels take the ``compact_input`` and
    ``compact_output`` keywords (activations holding the active channels only).
    The op layer widens and narrows activations around backends without it.
    """

    devices: tuple[str, ...] | None
    dtypes: tuple[torch.dtype, ...]
    grouped_conv: bool = False
    compact_activations: bool = False

    def runs(self, device_type: str, dtype: torch.dtype | None = None) -> bool:
        """Whether tensors of ``device_type`` and ``dtype`` (None: any dtype) are within these capabilities."""
        return (self.devices is None or device_type in self.devices) and (dtype is None or dtype in self.dtypes)


def _always_ready(device_type: str) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Backend:
    """A registered backend: its name, capabilities, readiness test and kernel files."""

    name: str
    capabilities: Capabilities
    kernels: tuple[ModuleType, ...]
    ready: Callable[[str], bool] = _always_ready
    # autograd_kernel's answers by op: it is asked on every eager call, and a
    # backend's files do not change once it is registered.
    _autograd_kernels: dict[str, Callable | None] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False)

    def is_available(self, device_type: str, dtype: torch.dtype | None = None) -> bool:
        return self.capabilities.runs(device_type, dtype) and self.ready(device_type)

    def kernel(self, entry: str) -> Callable | None:
        """The function called ``entry`` (e.g. ``"splora_linear_forward"``), or None."""
        for module in self.kernels:
            fn = getattr(module, entry, None)
            if fn is not None:
                return fn
        return None

    def autograd_kernel(self, op: str) -> Callable | None:
        """The function ``<op>_autograd``, or None: the whole op, forward and backward, with its own autograd.

        It takes the op's arguments less ``backend``.  A backend offers one where
        its autograd runs natively (the cpu backend's, in C++), so that an eager
        call skips the Python autograd formula; it must compute exactly what the
        op's forward and backward entries compute.
        """
        try:
            return self._autograd_kernels[op]
        except KeyError:
            fn = self._autograd_kernels[op] = self.kernel(f"{op}_autograd")
            return fn

    def implements(self, op: str) -> bool:
        return self.kernel(f"{op}_forward") is not None and self.kernel(f"{op}_backward") is not None


# Choices of resolve() for the argument the backend policy settled on, device
# type, dtype, op and groups; what they depend on besides (the registry, the
# auto preference) is part of the key or clears them.  Only choices that no
# run-time readiness test took part in are kept.
_CHOICES: dict[tuple, Backend] = {}


class _Registry(dict):
    """The registered backends by name; any change forgets the choices of :func:`resolve`."""

    def __setitem__(self, key, value) -> None:
        _CHOICES.clear()
        super().__setitem__(key, value)

    def __delitem__(self, key) -> None:
        _CHOICES.clear()
        super().__delitem__(key)

    def pop(self, *args):
        _CHOICES.clear()
        return super().pop(*args)

    def clear(self) -> None:
        _CHOICES.clear()
        super().clear()

    def update(self, *args, **kwargs) -> None:
        _CHOICES.clear()
        super().update(*args, **kwargs)

    def setdefault(self, key, default=None):
        _CHOICES.clear()
        return super().setdefault(key, default)

    def popitem(self):
        _CHOICES.clear()
        return super().popitem()


_REGISTRY: dict[str, Backend] = _Registry()
# Per-thread stack of use_backend() choices.  threading.local rather than a
# ContextVar because torch.compile can trace (and guard on) its lookup.
_LOCAL = threading.local()


def _forced_stack() -> list[str]:
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    return stack


def register_backend(backend: Backend) -> None:
    """Make ``backend`` selectable under ``backend.name`` (one of ``BACKEND_NAMES``)."""
    if backend.name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend name {backend.name!r}; add it to BACKEND_NAMES")
    _REGISTRY[backend.name] = backend


def unregister_backend(name: str) -> None:
    """Forget the backend called ``name`` (a no-op if none is registered)."""
    _REGISTRY.pop(name, None)


def registered() -> dict[str, Backend]:
    """The registered backends by name (a copy)."""
    return dict(_REGISTRY)


def check_name(name: object, argument: str = "backend") -> str:
    """``name`` if it is ``"auto"`` or a backend name (registered or not), else a clear error."""
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a str or None, got {type(name).__name__}")
    if name not in BACKEND_NAMES and name != "auto":
        raise ValueError(f"{argument} must be one of {('auto',) + BACKEND_NAMES}, got {name!r}")
    return name


def backends(device: str | torch.device = "cpu") -> list[str]:
    """Names of the backends that can run on ``device`` (a device or its type)."""
    device_type = torch.device(device).type
    return [name for name in BACKEND_NAMES if name in _REGISTRY and _REGISTRY[name].is_available(device_type)]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every op in the ``with`` block on backend ``name`` (or ``"auto"``)."""
    stack = _forced_stack()
    stack.append(check_name(name))
    try:
        yield
    finally:
        stack.pop()


def requested(backend: str | None) -> str:
    """The backend name asked for: the argument, else ``use_backend``, else the environment, else ``"auto"``."""
    if backend is not None and backend != "auto":
        return check_name(backend)
    forced = getattr(_LOCAL, "stack", ())
    if forced:
        return forced[-1]
    from_env = os.environ.get(ENV_VARIABLE)
    if from_env:
        return check_name(from_env.strip().lower(), ENV_VARIABLE)
    return "auto"  # backend is None or "auto" here


def _not_registered(name: str) -> str:
    if name == "cpu":
        return "backend='cpu' is not registered: the compiled extension spa_kernels._C is not built"
    if name == "cuda":
        return "backend='cuda' is not registered: no CUDA backend is built into this installation"
    return f"backend={name!r} is not registered (is its package installed?)"


def check_groups(name: str, groups: int) -> None:
    """Refuse ``groups > 1`` on a backend whose capabilities do not include grouped convolutions."""
    if groups == 1:
        return
    impl = _REGISTRY.get(name)
    if impl is None or not impl.capabilities.grouped_conv:
        grouped = tuple(n for n, b in _REGISTRY.items() if b.capabilities.grouped_conv)
        raise ValueError(
            f"groups={groups}: grouped and depthwise convolutions run on {grouped} only, "
            f"but backend={name!r} was asked for; use backend=None or one of those, or groups=1"
        )


def check_runs(name: str, device_type: str, dtype: torch.dtype, op: str, groups: int = 1) -> Backend:
    """The backend ``name``, after checking that it can run ``op`` here; otherwise a ``ValueError`` saying why."""
    check_groups(name, groups)  # first: a grouped call fails the same way whether the backend is built or not
    impl = _REGISTRY.get(name)
    if impl is None:
        raise ValueError(_not_registered(name))
    if not impl.is_available(device_type, dtype):
        raise ValueError(
            f"backend={name!r} cannot run on {device_type} tensors of {dtype} "
            f"(it runs {impl.capabilities.dtypes} on {impl.capabilities.devices or 'any device'}); "
            f"usable here: {backends(device_type)}"
        )
    if not impl.implements(op):
        raise ValueError(f"backend={name!r} does not implement {op}")
    return impl


def resolve(
    backend: str | None, device: torch.device, dtype: torch.dtype, op: str = "splora_linear", groups: int = 1
) -> Backend:
    """The backend that runs ``op`` on tensors of ``device`` and ``dtype`` (and ``groups``, for convolutions).

    A backend runs an op when its capabilities cover the device, dtype and
    groups, it is ready on the device, and it implements ``<op>_forward`` and
    ``<op>_backward``.  The choice is remembered per requested name (after the
    ``use_backend`` context and the environment), device type, dtype, op and
    groups, unless a readiness test that can change at run time took part
    (the Triton interpreter switch); registering or removing a backend forgets it.
    """
    # A choice made for this explicit name before: no need to check the name again.
    if type(backend) is str and backend != "auto" and not torch.compiler.is_compiling():
        device_type = device.type
        impl = _CHOICES.get((backend, device_type, dtype, op, groups, AUTO_PREFERENCE.get(device_type)))
        if impl is not None:
            return impl
    name = requested(backend)
    if torch.compiler.is_compiling():  # traced once per graph; no dictionary for Dynamo to guard on
        return _choose(name, device.type, dtype, op, groups)
    preference = AUTO_PREFERENCE.get(device.type)
    key = (name, device.type, dtype, op, groups, preference)
    impl = _CHOICES.get(key)
    if impl is None:
        impl = _choose(name, device.type, dtype, op, groups)
        consulted = (name,) if name != "auto" else preference or ("reference",)
        if all(_REGISTRY.get(n) is None or _REGISTRY[n].ready is _always_ready for n in consulted):
            _CHOICES[key] = impl
    return impl


def _choose(name: str, device_type: str, dtype: torch.dtype, op: str, groups: int) -> Backend:
    """What :func:`resolve` returns for the requested ``name``, worked out afresh."""
    if name != "auto":
        return check_runs(name, device_type, dtype, op, groups)
    for candidate in AUTO_PREFERENCE.get(device_type, ("reference",)):
        impl = _REGISTRY.get(candidate)
        if (impl is not None and impl.is_available(device_type, dtype) and impl.implements(op)
                and (groups == 1 or impl.capabilities.grouped_conv)):
            return impl
        if not torch.compiler.is_compiling():  # Dynamo cannot trace logging calls
            logger.debug("auto backend: %s cannot run %s for %s/%s", candidate, op, device_type, dtype)
    return _REGISTRY["reference"]


def get(name: str) -> Backend:
    """The registered backend called ``name``."""
    impl = _REGISTRY.get(name)
    if impl is None:
        raise ValueError(_not_registered(name))
    return impl


def autograd_kernel(name: str, op: str) -> Callable | None:
    """The ``<op>_autograd`` entry of the registered backend ``name`` (see :meth:`Backend.autograd_kernel`), or None."""
    impl = _REGISTRY.get(name)
    return None if impl is None else impl.autograd_kernel(op)


def kernel(name: str, entry: str) -> Callable:
    """The kernel ``entry`` (e.g. ``"splora_conv_backward"``) of the registered backend ``name``."""
    fn = get(name).kernel(entry)
    if fn is None:
        raise ValueError(f"backend={name!r} does not implement {entry}")
    return fn
