"""The ``spa_kernels`` op library, and what every op family shares.

Each op family has one file beside this one (``linear.py``, ``conv.py``) with
its schemas, fake kernels and autograd; this file holds the ``Library`` they
register on and the helpers they share: contiguity, the placeholders for
gradients not asked for, the fake kernel and zero-batch gradients of a backward
op.

Registering goes through torch.library's public API.

``torch.library.custom_op`` would do all of this from one decorator, but it
wraps every call of the implementation in further Python layers (its own
redispatch and a torch.compile guard).  Those cost 0.2–0.4 ms a call once a
large kernel has left the caches cold, against a masked layer whose forward
can take 2 ms.  Defining each op on a ``Library`` and registering its
implementation, fake kernel and autograd with the public functions keeps what
``custom_op`` gives (a schema inferred from the annotations, the
``pt2_compliant`` tag, one implementation for every device, the fake kernel
for tracing, the autograd formula) without the layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..backend import get, kernel

NAMESPACE = "spa_kernels"

_LIBRARY = torch.library.Library(NAMESPACE, "DEF")


def define_op(name: str, *, schema: str | None = None) -> Callable[[Callable], torch._ops.OpOverload]:
    """Decorator: defines ``spa_kernels::<name>`` with the function as its kernel on every device.

    ``schema`` (``"(args) -> returns"``) is inferred from the annotations when
    not given.  The decorated name becomes the op itself.
    """

    def register(fn: Callable) -> torch._ops.OpOverload:
        op_schema = schema if schema is not None else torch.library.infer_schema(fn, mutates_args=())
        _LIBRARY.define(name + op_schema, tags=(torch.Tag.pt2_compliant_tag,))
        _LIBRARY.impl(name, fn, "CompositeExplicitAutograd")
        return getattr(getattr(torch.ops, NAMESPACE), name).default

    return register


def register_fake(op: torch._ops.OpOverload) -> Callable[[Callable], Callable]:
    """Decorator: the op's fake kernel (shapes only), for tracing and torch.compile."""
    return torch.library.register_fake(op, lib=_LIBRARY)


def register_autograd(op: torch._ops.OpOverload, backward: Callable, *, setup_context: Callable) -> None:
    """The op's autograd formula (see ``torch.library.register_autograd``)."""
    torch.library.register_autograd(op, backward, setup_context=setup_context, lib=_LIBRARY)


def refuse_derivative(op: torch._ops.OpOverload) -> None:
    """Gives ``op`` (a backward op) an autograd kernel that refuses to differentiate it.

    Without one, backpropagating through a second derivative would fall back
    to the dispatcher's default and not raise; a double backward must fail
    loudly instead of returning a wrong answer.
    """

    def setup_context(ctx, inputs, output) -> None:
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"{op.name()} has no derivative: double backward through spa_kernels ops is not supported")

    register_autograd(op, backward, setup_context=setup_context)


# --------------------------------------------------------------------------- shared by the op families


def contiguous(t: Tensor | None) -> Tensor | None:
    """``t`` made contiguous (``None`` stays ``None``): backends never see strides."""
    return None if t is None else t.contiguous()


def own_storage(y: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``y`` (contiguous) reshaped to ``shape`` as a tensor of its own, not a view.

    An op's output must not be a view: autograd forbids in-place changes to views
    made inside a custom function (``nn.ReLU(inplace=True)`` after the layer would
    fail).  Pointing a fresh tensor at ``y``'s storage reshapes without a copy.
    """
    if y.shape == shape and not y._is_view():
        return y
    return y.new_empty(0).set_(y.untyped_storage(), y.storage_offset(), shape, torch.empty(shape, device="meta").stride())


def gradient_shapes(*operands: Tensor | None, out_channels) -> tuple:
    """Shapes of the gradients of ``operands`` and then of the bias ``(out_channels,)``; None for a missing operand."""
    return (*(None if t is None else t.shape for t in operands), (out_channels,))


def zero_gradients(output_mask: Sequence[bool], shapes: Sequence, like: Tensor) -> tuple[Tensor | None, ...]:
    """Gradients of a zero-size batch: zeros where asked for and the operand exists, else ``None``."""
    return tuple(
        like.new_zeros(shape) if want and shape is not None else None
        for want, shape in zip(output_mask, shapes, strict=True)
    )


def fake_gradients(output_mask: Sequence[bool], shapes: Sequence, like: Tensor) -> tuple[Tensor, ...]:
    """The fake kernel of a backward op: the gradients' shapes, placeholders where not asked for."""
    return tuple(
        like.new_empty(shape) if want and shape is not None else like.new_empty(0)
        for want, shape in zip(output_mask, shapes, strict=True)
    )


def with_placeholders(grads: Sequence[Tensor | None], like: Tensor) -> tuple[Tensor, ...]:
    """``grads`` with every ``None`` (not asked for) replaced by an empty tensor: schemas cannot return ``None``."""
    return tuple(like.new_empty(0) if g is None else g for g in grads)


def wanted(grads: Sequence[Tensor], output_mask: Sequence[bool]) -> list[Tensor | None]:
    """The placeholders of a backward op turned back into ``None`` for autograd."""
    return [g if want else None for g, want in zip(grads, output_mask, strict=True)]


# --------------------------------------------------------------------------- compact activations


def compact_width(idx: Tensor | None, full: int) -> int:
    """Channels of a compact tensor over the active list ``idx`` (``None``: all ``full`` are active)."""
    return full if idx is None else idx.shape[0]


def native_compact(backend: str) -> bool:
    """Whether backend ``backend`` reads and writes compact activations itself."""
    return get(backend).capabilities.compact_activations


def run_forward(backend: str, entry: str, x: Tensor, operands: Sequence, in_idx: Tensor | None,
                out_idx: Tensor | None, in_channels: int, compact_input: bool, compact_output: bool) -> Tensor:
    """``entry(x, *operands)`` on ``backend``, with activations compact as asked.

    Channels are dimension 1 of ``x`` and of the result.  ``operands`` ends where
    the kernel's positional arguments end; the flags go as keywords to backends
    that take compact activations, and are resolved here for the others.
    """
    forward = kernel(backend, entry)
    if not (compact_input or compact_output):
        return forward(x, *operands)
    if native_compact(backend):
        return forward(x, *operands, compact_input=compact_input, compact_output=compact_output)
    if compact_input:
        x = widen_channels(x, 1, in_idx, in_channels)
    y = forward(x, *operands)
    return narrow_channels(y, 1, out_idx) if compact_output else y


def run_backward(backend: str, entry: str, grad_out: Tensor, x: Tensor, operands: Sequence, in_idx: Tensor | None,
                 out_idx: Tensor | None, in_channels: int, out_channels: int, compact_input: bool,
                 compact_output: bool) -> tuple[Tensor | None, ...]:
    """``entry(grad_out, x, *operands)`` on ``backend``; like :func:`run_forward`.

    The gradient of ``x`` (first) comes back in ``x``'s layout, compact or not.
    """
    backward = kernel(backend, entry)
    if not (compact_input or compact_output):
        return backward(grad_out, x, *operands)
    if native_compact(backend):
        return backward(grad_out, x, *operands, compact_input=compact_input, compact_output=compact_output)
    if compact_input:
        x = widen_channels(x, 1, in_idx, in_channels)
    if compact_output:
        grad_out = widen_channels(grad_out, 1, out_idx, out_channels)
    grads = tuple(backward(grad_out, x, *operands))
    if compact_input and grads[0] is not None:
        grads = (narrow_channels(grads[0], 1, in_idx), *grads[1:])
    return grads


def compact_flags(flags: Sequence) -> tuple[bool, bool]:
    """``(compact_input, compact_output)`` from an op's trailing inputs (absent: False)."""
    flags = tuple(bool(flag) for flag in flags)
    return flags + (False,) * (2 - len(flags))


def widen_channels(t: Tensor, dim: int, idx: Tensor | None, full: int) -> Tensor:
    """A compact ``t`` placed at channels ``idx`` of a zero tensor ``full`` wide on ``dim``.

    The fallback for backends that only take full-width activations.
    """
    if idx is None:
        return t
    shape = list(t.shape)
    shape[dim] = full
    return t.new_zeros(shape).index_copy_(dim, idx, t)


def narrow_channels(t: Tensor, dim: int, idx: Tensor | None) -> Tensor:
    """The channels ``idx`` of a full-width ``t`` on ``dim``, as a compact tensor (``None``: all)."""
    return t if idx is None else t.index_select(dim, idx)
