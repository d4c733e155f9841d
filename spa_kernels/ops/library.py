"""Registering the ops with the dispatcher, through torch.library's public API.

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

from collections.abc import Callable

import torch

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
