"""The ``spa_kernels`` op library, and what every op family shares.

Each op family has one file beside this one (``linear.py``, ``conv.py``) with
its schemas, fake kernels and autograd; this file holds the ``Library`` they
register on and the helpers they share: contiguity, the placeholders for
gradients not asked for, the fake kernel and zero-batch gradients of a backward
op, and the calls that hand compact activations to a backend (widened with
zeros, and narrowed back, for backends that only take full-width ones).

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

Even so, a call through the dispatcher into a Python kernel and through the
Python autograd kernel costs some 20 µs, more than a small layer computes.  So
:func:`call` runs an op's implementation and autograd formula directly, as an
``autograd.Function``, whenever nothing between the caller and the op could want
to see it (see :func:`runs_directly`): in plain eager code.  Where the backend
carries the op's autograd itself (the cpu backend's, in C++) that runs instead,
and the backward never enters Python.  Under
torch.compile, a dispatch or function mode (fake tensors, tracing, FLOP
counters), a tensor subclass, a functorch transform, the JIT tracer or the
profiler the op goes through the dispatcher as before.  Either way the same
implementation and the same formula run, so results are identical.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.overrides import has_torch_function

from ..backend import autograd_kernel, get, kernel

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
        op = getattr(getattr(torch.ops, NAMESPACE), name).default
        _DIRECT[op] = DirectCall(name, fn, _leading_tensor_count(op), _backend_position(op))
        return op

    return register


def register_fake(op: torch._ops.OpOverload) -> Callable[[Callable], Callable]:
    """Decorator: the op's fake kernel (shapes only), for tracing and torch.compile."""
    return torch.library.register_fake(op, lib=_LIBRARY)


def register_autograd(op: torch._ops.OpOverload, backward: Callable, *, setup_context: Callable) -> None:
    """The op's autograd formula (see ``torch.library.register_autograd``), for the dispatcher and :func:`call`."""
    torch.library.register_autograd(op, backward, setup_context=setup_context, lib=_LIBRARY)
    direct = _DIRECT[op]
    implementation = direct.implementation

    # The forward takes ctx and sets it up itself: with a separate setup_context,
    # Function.apply binds the arguments through inspect.signature on every call.
    def forward(ctx, *args):
        output = implementation(*args)
        setup_context(ctx, args, output)
        return output

    direct.function = type(
        f"{op._opname}_direct",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )


# --------------------------------------------------------------------------- direct calls


@dataclass
class DirectCall:
    """What :func:`call` needs of an op: its implementation, how many tensors lead its arguments, its formula."""

    name: str
    implementation: Callable
    tensor_count: int
    backend_position: int  # of the ``backend`` argument
    function: type[torch.autograd.Function] | None = None  # None for ops without an autograd formula


_DIRECT: dict[torch._ops.OpOverload, DirectCall] = {}


def _leading_tensor_count(op: torch._ops.OpOverload) -> int:
    """Arguments before the first non-tensor one: every op here takes its tensors first."""
    count = 0
    for argument in op._schema.arguments:
        if str(argument.type) not in ("Tensor", "Optional[Tensor]"):
            break
        count += 1
    return count


def _backend_position(op: torch._ops.OpOverload) -> int:
    """Index of the ``backend`` argument: every op here takes the resolved backend name."""
    return next(i for i, argument in enumerate(op._schema.arguments) if argument.name == "backend")


def runs_directly(tensors: Sequence[Tensor | None]) -> bool:
    """Whether an op on ``tensors`` may skip the dispatcher: nothing would see the op as one.

    Eager code only: not while torch.compile traces, not for tensor subclasses
    or under a function mode (``has_torch_function``), a dispatch mode (fake
    tensors, ``make_fx``, FLOP counters), a functorch transform (``vmap``,
    ``grad``), the JIT tracer or the profiler, each of which records or
    reinterprets the op itself.
    """
    return not (
        _is_compiling()
        or has_torch_function(tensors)
        or _dispatch_stack_depth()
        or _functorch_interpreter() is not None
        or _jit_tracing_state() is not None
        or _profiler_enabled()
    )


# Looked up once: resolving each through torch's module attributes cost a small
# layer's call about 0.3 µs.  tests/ops/test_direct_calls.py checks each
# condition, so a torch upgrade that moves one fails there.
_is_compiling = torch.compiler.is_compiling
_dispatch_stack_depth = torch._C._len_torch_dispatch_stack
_functorch_interpreter = torch._C._functorch.peek_interpreter_stack
_jit_tracing_state = torch._C._get_tracing_state
_profiler_enabled = torch._C._autograd._profiler_enabled


def _any_requires_grad(tensors: Sequence[Tensor | None]) -> bool:
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def call(op: torch._ops.OpOverload, *args):
    """``op(*args)``, running the implementation (and formula) directly where :func:`runs_directly`.

    A backend with an ``<op>_autograd`` entry (its own autograd, e.g. in C++)
    runs that.  Otherwise, without a gradient to record the implementation runs
    as is; with one it runs as an ``autograd.Function`` holding the op's own
    formula (for a backward op, the formula of :func:`refuse_derivative`, as
    through the dispatcher).
    """
    direct = _DIRECT[op]
    tensors = args[:direct.tensor_count]
    if not runs_directly(tensors):
        return op(*args)
    position = direct.backend_position
    native = autograd_kernel(args[position], direct.name) if direct.function is not None else None
    if native is not None:
        return native(*args[:position], *args[position + 1:])
    if torch.is_grad_enabled() and _any_requires_grad(tensors):
        if direct.function is None:
            return op(*args)
        return direct.function.apply(*args)
    return direct.implementation(*args)


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


def factor(t: Tensor | None) -> Tensor | None:
    """An adapter factor as backends take it: 2-D and contiguous (``None`` stays ``None``).

    Modules pass ``A`` and ``B`` as they hold them, ``(1, r, in)`` and ``(1, out, r)``:
    taking ``[0]`` in the module would add a view, and its autograd node, per call.
    """
    if t is None:
        return None
    if t.dim() == 3:
        if t.shape[0] != 1:
            raise ValueError(f"an adapter factor must be 2-D, or 3-D with a leading dimension of 1; got {tuple(t.shape)}")
        t = t[0]
    return t.contiguous()


def shaped_as(grad: Tensor | None, operand: Tensor | None) -> Tensor | None:
    """A backend's gradient of ``operand`` (a 2-D factor) in ``operand``'s own shape."""
    if grad is None or operand is None or grad.shape == operand.shape:
        return grad
    return own_storage(grad.contiguous(), tuple(operand.shape))


def as_matrix(t: Tensor, columns) -> Tensor:
    """``t`` as a contiguous ``(-1, columns)`` matrix; a 2-D ``t`` skips the reshape, which costs a view."""
    if t.dim() == 2:
        return t.contiguous()
    if columns == 0:  # every channel pruned: reshape cannot infer the row count of an empty tensor
        return t.reshape(t.shape[:-1].numel(), 0)
    return t.reshape(-1, columns).contiguous()


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
