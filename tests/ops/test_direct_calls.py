"""Direct calls: in plain eager code an op runs without the dispatcher, with the same result.

``spa_kernels.ops.call`` runs an op's implementation (and its autograd formula,
as an ``autograd.Function``) directly when nothing could want to see the op as
one; otherwise it goes through the dispatcher.  These tests check that

- the private torch functions that decision reads still exist and mean what
  they meant (they fail on a torch upgrade that changes them);
- eager module calls take the direct path, and give bit-identical outputs and
  gradients to the dispatched op;
- a dispatch mode, the profiler, a functorch transform and tensor subclasses
  still see the op itself;
- a double backward is still refused.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import spa_kernels
from spa_kernels import ops
from spa_kernels.nn import SPLoRAConv2d, SPLoRALinear, SPPaRAConv2d
from spa_kernels.ops.library import runs_directly

BACKENDS = [name for name in ("reference", "cpu") if name in spa_kernels.backends("cpu")]


class RecordingMode(TorchDispatchMode):
    """Names of the ops that reach the dispatcher while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


# --------------------------------------------------------------------------- the private torch API read


def test_private_torch_functions_behind_runs_directly_still_mean_the_same():
    x = torch.randn(3)
    assert torch._C._len_torch_dispatch_stack() == 0
    with RecordingMode():
        assert torch._C._len_torch_dispatch_stack() == 1
    assert torch._C._functorch.peek_interpreter_stack() is None
    seen = []
    torch.func.vmap(lambda t: seen.append(torch._C._functorch.peek_interpreter_stack()) or t)(torch.randn(2, 3))
    assert seen and seen[0] is not None
    assert torch._C._get_tracing_state() is None
    traced = []
    with warnings.catch_warnings():  # the JIT tracer is deprecated, and warns so
        warnings.simplefilter("ignore")
        torch.jit.trace(lambda t: traced.append(torch._C._get_tracing_state()) or t * 2, (x,), check_trace=False)
    assert traced and traced[0] is not None
    assert not torch._C._autograd._profiler_enabled()
    with torch.profiler.profile():
        assert torch._C._autograd._profiler_enabled()
    assert not torch._C._autograd._profiler_enabled()


def test_leading_tensor_counts_read_from_the_schemas():
    counts = {name: ops.library._DIRECT[getattr(ops, name)].tensor_count for name in ops.__all__ if name != "call"}
    assert counts == {
        "splora_linear": 7, "splora_linear_backward": 7,
        "splora_conv": 7, "splora_conv_backward": 7,
        "sppara_conv": 6, "sppara_conv_backward": 6,
        "splopa_linear": 7, "splopa_linear_backward": 7,
    }


def test_runs_directly_only_in_plain_eager_code():
    x = torch.randn(2, 3)
    assert runs_directly((x, torch.nn.Parameter(x), None))
    with RecordingMode():
        assert not runs_directly((x,))
    with torch.profiler.profile():
        assert not runs_directly((x,))
    with torch.device("cpu"):  # a torch function mode
        assert not runs_directly((x,))

    class Subclass(torch.Tensor):
        pass

    assert not runs_directly((x.as_subclass(Subclass),))
    seen = []
    torch.func.vmap(lambda t: seen.append(runs_directly((t,))) or t)(x)
    assert seen == [False]


# --------------------------------------------------------------------------- modules on the direct path


def _layers(backend: str) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    masks = (torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool), torch.tensor([0, 1, 1, 0, 1], dtype=torch.bool))
    layers = [SPLoRALinear(6, 5, rank=2, init_range=0.3, backend=backend),
              SPLoRAConv2d(6, 5, 3, padding=1, rank=2, init_range=0.3, backend=backend),
              SPPaRAConv2d(6, 5, 3, padding=1, init_range=0.3, backend=backend)]
    for layer in layers:
        layer.set_masks(*masks)
        layer.bias.requires_grad_(True)
    return layers


def _input(layer: torch.nn.Module) -> torch.Tensor:
    shape = (4, 6) if isinstance(layer, SPLoRALinear) else (2, 6, 5, 5)
    return torch.randn(shape, requires_grad=True)


def _forward_and_gradients(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    y = layer(x)
    trained = [x] + [p for p in layer.parameters() if p.requires_grad]
    return y, list(torch.autograd.grad(y, trained, torch.ones_like(y)))


# The cpu backend carries its ops' autograd in C++ (csrc/cpu/autograd.cpp):
# eager calls record its nodes; others run the op's Python formula directly.
CPP_NODES = ("spa_kernels::cpu::LinearFunction>", "spa_kernels::cpu::ConvFunction>")


def _is_direct(grad_fn, backend: str) -> bool:
    if backend == "cpu":
        return grad_fn.name().endswith(CPP_NODES)
    return "_direct" in type(grad_fn).__name__


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_module_calls_skip_the_dispatcher_with_identical_results(backend):
    for layer in _layers(backend):
        x = _input(layer)
        direct_y, direct_grads = _forward_and_gradients(layer, x)
        assert _is_direct(direct_y.grad_fn, backend)
        with RecordingMode() as mode:  # a dispatch mode: the op goes through the dispatcher
            dispatched_y, dispatched_grads = _forward_and_gradients(layer, x)
        assert any(name.startswith("spa_kernels.") for name in mode.names)
        assert not _is_direct(dispatched_y.grad_fn, backend)
        assert torch.equal(direct_y, dispatched_y)
        for direct, dispatched in zip(direct_grads, dispatched_grads, strict=True):
            assert torch.equal(direct, dispatched)
        with torch.no_grad():
            assert torch.equal(layer(x), direct_y)
            assert layer(x).grad_fn is None


def test_direct_backward_runs_the_backward_op_directly():
    layer = _layers("reference")[0]
    y = layer(_input(layer))
    with RecordingMode() as mode:  # active for the backward only: the backward op is dispatched
        y.sum().backward()
    assert "spa_kernels.splora_linear_backward.default" in mode.names


def test_profiler_still_records_the_op():
    layer = _layers("reference")[0]
    with torch.profiler.profile() as profile:
        layer(_input(layer)).sum().backward()
    names = {event.name for event in profile.events()}
    assert "spa_kernels::splora_linear" in names and "spa_kernels::splora_linear_backward" in names


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
def test_cpu_backward_runs_in_cpp_without_python_ops():
    for layer in _layers("cpu"):
        y = layer(_input(layer))
        with RecordingMode() as mode:
            y.sum().backward()
        assert not any(name.startswith("spa_kernels.") for name in mode.names), mode.names


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_through_a_module_is_refused(backend):
    for layer in _layers(backend):
        layer.double()
        x = _input(layer).double().detach().requires_grad_(True)
        y = layer(x)
        (grad_x,) = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True)
        assert grad_x.requires_grad  # recorded, so that differentiating it reaches the refusal
        with pytest.raises(RuntimeError, match="has no derivative"):
            torch.autograd.grad(grad_x.sum(), layer.adapter if isinstance(layer, SPPaRAConv2d) else
                                layer.adapter.rows)
