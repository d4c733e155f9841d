"""Autograd and op-registration checks of ``splopa_linear`` on every backend.

gradcheck in float64 on tiny shapes (every differentiable input); opcheck on
the forward and the backward op; torch.compile(fullgraph=True) equals eager;
a double backward raises.
"""

from __future__ import annotations

import pytest
import torch
from support.linear_cases import check_results, forced_isa, skip_unless_available
from support.splopa_cases import (
    GRAD_NAMES,
    OPERAND_NAMES,
    SPLoPASpec,
    build_case,
    non_reference_splopa_params,
    run,
    splopa_backends,
)

import spa_kernels

ALL_BACKENDS = [pytest.param(("reference", None), id="reference"), *non_reference_splopa_params()]
OP_BACKENDS = splopa_backends()

TINY_SPECS = {
    "half-pruned": SPLoPASpec(lead=(3,), block_rows=2, block_cols=3, block_shape=(2, 3), num_prototypes=2, rank=2),
    "all-active-nd-noncontiguous": SPLoPASpec(lead=(2, 2), block_rows=2, block_cols=2, block_shape=(3, 2),
                                              num_prototypes=3, rank=1, density=None, noncontiguous=True),
    "all-pruned-no-bias": SPLoPASpec(lead=(2,), block_rows=2, block_cols=2, block_shape=(2, 2), density=0.0,
                                     bias=False),
    "vector-x-1x1-blocks": SPLoPASpec(lead=(), block_rows=3, block_cols=2, block_shape=(1, 1), num_prototypes=2,
                                      rank=1, scale=-1.5),
}


@pytest.mark.parametrize("spec_name", list(TINY_SPECS))
@pytest.mark.parametrize("backend_param", ALL_BACKENDS)
def test_gradcheck_float64(backend_param, spec_name):
    backend, isa = backend_param
    skip_unless_available(backend, torch.float64)
    case = build_case(TINY_SPECS[spec_name])
    leaves = case.leaves(torch.float64, plant_nan=False)
    names = [n for n in case.spec.grads if leaves[n] is not None]

    def splopa(*differentiable):
        args = case.presented({**leaves, **dict(zip(names, differentiable, strict=True))})
        return spa_kernels.splopa_linear(*(args[n] for n in OPERAND_NAMES), case.block_mask,
                                         scale=case.spec.scale, backend=backend)

    with forced_isa(isa):
        assert torch.autograd.gradcheck(splopa, tuple(leaves[n] for n in names), eps=1e-6, atol=1e-8, rtol=1e-6)


def _op_args(case, dtype=torch.float32):
    leaves = case.leaves(dtype)
    return [None if leaves[n] is None else leaves[n].detach() for n in OPERAND_NAMES]


@pytest.mark.parametrize("spec_name", ["half-pruned", "all-active-nd-noncontiguous"])
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_opcheck_forward(backend, spec_name):
    case = build_case(TINY_SPECS[spec_name])
    args = _op_args(case)
    torch.library.opcheck(torch.ops.spa_kernels.splopa_linear.default,
                          (*args, case.block_mask, case.spec.scale, backend))


@pytest.mark.parametrize("output_mask", [[True, True, True, True, True, True], [False, False, True, False, True, False],
                                         [True, False, False, True, False, True]])
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_opcheck_backward(backend, output_mask):
    case = build_case(TINY_SPECS["half-pruned"])
    x, weight, rows, cols, pos_weights, _ = _op_args(case)
    grad_out = torch.randn(x.shape[0], weight.shape[0])
    torch.library.opcheck(
        torch.ops.spa_kernels.splopa_linear_backward.default,
        (grad_out, x, weight, rows, cols, pos_weights, case.block_mask, case.spec.scale, backend, output_mask),
    )


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    case = build_case(SPLoPASpec(lead=(6,)))
    compiled = torch.compile(spa_kernels.splopa_linear, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (spa_kernels.splopa_linear, compiled):
        leaves = case.leaves(torch.float32)
        y = fn(*(leaves[n] for n in OPERAND_NAMES), case.block_mask, scale=0.7, backend=backend)
        grads = torch.autograd.grad(y, [leaves[n] for n in GRAD_NAMES], torch.ones_like(y))
        results.append({"y": y.detach(), **dict(zip(GRAD_NAMES, grads, strict=True))})
    check_results(f"compiled[{backend}]", results[1], {k: v.double() for k, v in results[0].items()}, torch.float32)


def test_double_backward_raises():
    case = build_case(SPLoPASpec())
    leaves = case.leaves(torch.float64, plant_nan=False)
    y = spa_kernels.splopa_linear(*(leaves[n] for n in OPERAND_NAMES), case.block_mask, backend="reference")
    (grad_x,) = torch.autograd.grad(y.sum(), leaves["x"], create_graph=True)
    with pytest.raises(RuntimeError, match="no derivative"):
        grad_x.sum().backward()


def test_zero_batch():
    case = build_case(SPLoPASpec(lead=(0,)))
    result = run(case, torch.float32, "reference")
    assert result["y"].shape == (0, case.spec.out_features)
    assert all(float(g.abs().sum()) == 0 for k, g in result.items() if k not in ("y", "x"))
