"""Autograd and op-registration checks of ``splora_linear`` on every backend.

- ``torch.autograd.gradcheck`` in float64 on tiny shapes: the registered
  backward against finite differences, for every input that can need a grad.
- ``torch.library.opcheck`` on the forward and the backward op: schema,
  fake kernel, autograd registration and AOT dispatch with dynamic shapes.
- ``torch.compile(fullgraph=True)``: the op traces without graph breaks and
  the compiled result equals eager.
"""

from __future__ import annotations

import pytest
import torch
from support.linear_cases import (
    GRAD_NAMES,
    LinearSpec,
    build_case,
    check_results,
    forced_isa,
    non_reference_backend_params,
    recording_backend_calls,
    skip_unless_available,
)

import spa_kernels

ALL_BACKENDS = [pytest.param(("reference", None), id="reference"),
                *non_reference_backend_params(with_small_problems=True)]
OP_BACKENDS = spa_kernels.backends("cpu")  # opcheck and compile: one run per backend name

TINY_SPECS = {
    "tiny": LinearSpec(lead=(3,), in_features=5, out_features=4, rank=2, keep_in=3, keep_out=2,
                       scale=0.7, grads=GRAD_NAMES),
    "tiny-nd-noncontiguous": LinearSpec(lead=(2, 2), in_features=4, out_features=3, rank=3,
                                        keep_in=None, keep_out=2, noncontiguous=True, grads=GRAD_NAMES),
    "tiny-no-adapter-int32": LinearSpec(lead=(2,), in_features=4, out_features=5, rank=None, keep_in=2,
                                        keep_out=3, in_index_dtype=torch.int32, grads=GRAD_NAMES),
    "tiny-vector-x-all-active": LinearSpec(lead=(), in_features=3, out_features=2, rank=1,
                                           keep_in=None, keep_out=None, scale=-1.5, grads=GRAD_NAMES),
    "tiny-all-pruned": LinearSpec(lead=(2,), in_features=3, out_features=3, rank=1, keep_in=0.0,
                                  keep_out=0.0, grads=GRAD_NAMES),
    "tiny-adapter-only": LinearSpec(lead=(4,), in_features=5, out_features=4, rank=2, keep_in=3,
                                    keep_out=3, grads=("lora_a", "lora_b")),
}


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("spec_name", list(TINY_SPECS))
@pytest.mark.parametrize("backend_param", ALL_BACKENDS)
def test_gradcheck_float64(backend_param, spec_name):
    backend, isa = backend_param
    skip_unless_available(backend, torch.float64)
    case = build_case(TINY_SPECS[spec_name])
    leaves = case.leaves(torch.float64)
    names = case.spec.requested_grads
    assert names, "a gradcheck case must differentiate something"

    def splora(*differentiable):
        args = case.presented({**leaves, **dict(zip(names, differentiable, strict=True))})
        return spa_kernels.splora_linear(
            args["x"], args["weight"], args["lora_a"], args["lora_b"], args["bias"],
            case.in_idx, case.out_idx, scale=case.spec.scale, backend=backend,
        )

    with forced_isa(isa):
        assert torch.autograd.gradcheck(splora, tuple(leaves[n] for n in names), eps=1e-6, atol=1e-8, rtol=1e-6)


# --------------------------------------------------------------------------- opcheck


def _op_inputs(case, dtype=torch.float32):
    leaves = case.leaves(dtype)
    return leaves, (leaves["x"], leaves["weight"], leaves["lora_a"], leaves["lora_b"], leaves["bias"],
                    case.in_idx if case.in_idx is None else case.in_idx.long(),
                    case.out_idx if case.out_idx is None else case.out_idx.long())


OPCHECK_SPECS = {
    "pruned-adapter-bias": LinearSpec(lead=(5,), in_features=7, out_features=6, rank=2),
    "dense-nd-weight-grad": LinearSpec(lead=(2, 3), in_features=5, out_features=4, rank=None, bias=False,
                                       keep_in=None, keep_out=None, grads=("x", "weight")),
}


@pytest.mark.parametrize("spec_name", list(OPCHECK_SPECS))
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_opcheck_forward(backend, spec_name):
    case = build_case(OPCHECK_SPECS[spec_name])
    _, args = _op_inputs(case)
    torch.library.opcheck(torch.ops.spa_kernels.splora_linear.default, (*args, case.spec.scale, backend))


@pytest.mark.parametrize(
    ("spec_name", "output_mask"),
    [("pruned-adapter-bias", [True, False, True, True, True]),
     ("pruned-adapter-bias", [False, True, False, True, False]),
     ("dense-nd-weight-grad", [True, True, False, False, False])],
)
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_opcheck_backward(backend, spec_name, output_mask):
    case = build_case(OPCHECK_SPECS[spec_name])
    x, weight, lora_a, lora_b, _, in_idx, out_idx = (
        t.detach() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in _op_inputs(case)[1]
    )
    grad_out = case.grad_out.float()
    torch.library.opcheck(
        torch.ops.spa_kernels.splora_linear_backward.default,
        (grad_out, x, weight, lora_a, lora_b, in_idx, out_idx, case.spec.scale, backend, output_mask),
    )


# --------------------------------------------------------------------------- torch.compile

COMPILE_SPEC = LinearSpec(lead=(6,), in_features=9, out_features=7, rank=3, scale=0.5, grads=GRAD_NAMES)


def _eager_and_compiled(fn, case):
    eager_leaves, compiled_leaves = case.leaves(torch.float32), case.leaves(torch.float32)
    results = []
    for leaves, run in ((eager_leaves, fn), (compiled_leaves, torch.compile(fn, fullgraph=True, backend="aot_eager"))):
        y = run(leaves)
        wanted = [leaves[n] for n in case.spec.requested_grads]
        grads = torch.autograd.grad(y, wanted, grad_outputs=case.grad_out.float())
        results.append({"y": y.detach(), **dict(zip(case.spec.requested_grads, grads, strict=True))})
    return results


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_compile_op_fullgraph_matches_eager(backend):
    """The custom op and its autograd trace without graph breaks (fake kernels)."""
    torch._dynamo.reset()
    case = build_case(COMPILE_SPEC)
    in_idx, out_idx = case.in_idx.long(), case.out_idx.long()

    def fn(t):
        return torch.ops.spa_kernels.splora_linear(
            t["x"], t["weight"], t["lora_a"], t["lora_b"], t["bias"], in_idx, out_idx, 0.5, backend
        )

    eager, compiled = _eager_and_compiled(fn, case)
    check_results(f"compiled-op[{backend}]", compiled, {k: v.double() for k, v in eager.items()}, torch.float32)


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_compile_public_api_explicit_backend(backend):
    """``splora_linear`` with ``backend=`` named and no index lists compiles in one graph."""
    torch._dynamo.reset()
    case = build_case(LinearSpec(lead=(6,), in_features=9, out_features=7, rank=3, keep_in=None,
                                 keep_out=None, grads=GRAD_NAMES))

    def fn(t):
        return spa_kernels.splora_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], t["bias"],
                                         scale=0.5, backend=backend)

    eager, compiled = _eager_and_compiled(fn, case)
    check_results(f"compiled-api[{backend}]", compiled, {k: v.double() for k, v in eager.items()}, torch.float32)


def _compile_public_api_default_backend(expected_backend: str):
    """Compiles ``splora_linear`` without ``backend=`` and checks that auto ran ``expected_backend``."""
    torch._dynamo.reset()
    case = build_case(LinearSpec(lead=(6,), in_features=9, out_features=7, rank=3, keep_in=None,
                                 keep_out=None, grads=GRAD_NAMES))

    def fn(t):
        return spa_kernels.splora_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], t["bias"], scale=0.5)

    with recording_backend_calls() as calls:
        eager, compiled = _eager_and_compiled(fn, case)
    # eager and compiled, forward and backward: every op call on the one backend auto chose
    assert calls and set(calls) == {expected_backend}, f"auto ran {calls}, expected {expected_backend!r} only"
    check_results("compiled-api[auto]", compiled, {k: v.double() for k, v in eager.items()}, torch.float32)


def test_compile_public_api_default_backend(monkeypatch):
    """Auto selection (use_backend stack, environment, registry) traces without a break."""
    monkeypatch.delenv("SPA_KERNELS_BACKEND", raising=False)
    _compile_public_api_default_backend("cpu" if "cpu" in spa_kernels.backends("cpu") else "reference")


def test_compile_public_api_auto_fallback(monkeypatch):
    """Without the cpu backend, the compiled auto choice falls back to the reference, and the reference runs."""
    monkeypatch.delenv("SPA_KERNELS_BACKEND", raising=False)
    monkeypatch.delitem(spa_kernels.backend._REGISTRY, "cpu", raising=False)
    _compile_public_api_default_backend("reference")


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_compile_dynamic_batch(backend):
    """One dynamic-shape graph serves several batch sizes and matches eager on each."""
    torch._dynamo.reset()
    spec = LinearSpec(in_features=9, out_features=7, rank=3, grads=("x", "lora_a", "lora_b", "bias"))
    base = build_case(spec)
    in_idx, out_idx = base.in_idx.long(), base.out_idx.long()

    def fn(x, weight, lora_a, lora_b, bias):
        return torch.ops.spa_kernels.splora_linear(x, weight, lora_a, lora_b, bias, in_idx, out_idx, 0.5, backend)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for rows in (3, 5, 11):
        x = torch.randn(rows, spec.in_features)
        args = (x, base.weight.float(), base.lora_a.float(), base.lora_b.float(), base.bias.float())
        expected = fn(*args)
        got = compiled(*args)
        check_results(f"compiled-dynamic[{backend}, M={rows}]", {"y": got}, {"y": expected.double()}, torch.float32)


def test_double_backward_is_refused_not_wrong():
    """The backward op has no derivative: a second derivative must raise, not return garbage."""
    case = build_case(LinearSpec(lead=(3,), in_features=4, out_features=3, rank=2, grads=GRAD_NAMES))
    leaves = case.leaves(torch.float64)
    y = spa_kernels.splora_linear(leaves["x"], leaves["weight"], leaves["lora_a"], leaves["lora_b"],
                                  leaves["bias"], case.in_idx, case.out_idx, backend="reference")
    (grad_x,) = torch.autograd.grad(y, leaves["x"], grad_outputs=torch.ones_like(y), create_graph=True)
    with pytest.raises(RuntimeError, match="has no derivative"):
        torch.autograd.grad(grad_x.sum(), leaves["lora_a"])
