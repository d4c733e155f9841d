"""The reference ``splopa_linear`` against the independent float64 oracle (forward and every gradient)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.splopa_cases import SPLoPASpec, build_case, check_against_oracle, oracle_forward, random_specs

import spa_kernels
from spa_kernels.backend.reference.splopa import splopa_linear_forward

SPECS = {
    "default": SPLoPASpec(),
    "all-active-mask-none": SPLoPASpec(density=None),
    "all-active-mask-given": SPLoPASpec(density=1.0),
    "tenth": SPLoPASpec(block_rows=5, block_cols=6, density=0.1),
    "all-pruned": SPLoPASpec(density=0.0),
    "one-block": SPLoPASpec(block_rows=4, block_cols=4, density=1 / 16),
    "batch-1-no-bias": SPLoPASpec(lead=(1,), bias=False),
    "vector-x": SPLoPASpec(lead=()),
    "nd-noncontiguous": SPLoPASpec(lead=(2, 3), noncontiguous=True),
    "1x1-blocks-rank-1": SPLoPASpec(block_shape=(1, 1), block_rows=7, block_cols=5, rank=1),
    "prime-blocks-large-rank": SPLoPASpec(block_shape=(7, 11), block_rows=2, block_cols=3, rank=7, num_prototypes=1),
    "frozen-weight": SPLoPASpec(grads=("x", "prototype_rows", "prototype_cols", "pos_weights", "bias")),
    "adapter-only": SPLoPASpec(grads=("prototype_rows", "pos_weights")),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_reference_matches_oracle(spec_name, dtype):
    check_against_oracle(f"reference {spec_name}", build_case(SPECS[spec_name]), dtype, "reference")


@settings(max_examples=25, deadline=None)
@given(spec=random_specs(
    lead=4, blocks=4, block_side=5, prototypes=4, rank=3, min_lead_dims=0,
    # zero, or far from float64's subnormals, where the order of the products decides underflow
    scale=st.one_of(st.just(0.0), st.floats(1e-3, 2.0), st.floats(-2.0, -1e-3)),
))
def test_reference_matches_oracle_random(spec):
    check_against_oracle("reference random", build_case(spec), torch.float64, "reference")


def test_oracle_is_the_paper_formula_on_one_block():
    """The oracle itself, on a hand-checkable case: one prototype, one active block."""
    x = torch.tensor([[1.0, 2.0, 0.0, 0.0]], dtype=torch.float64)
    weight = torch.zeros(2, 4, dtype=torch.float64)
    rows = torch.tensor([[[1.0, 1.0]]], dtype=torch.float64)  # V: (1, 1, 2)
    cols = torch.tensor([[[2.0]]], dtype=torch.float64)  # U: (1, 1, 1) -> Π = [[2, 2]]
    pos_weights = torch.tensor([[[3.0, 5.0], [7.0, 11.0]]], dtype=torch.float64)
    mask = torch.tensor([[True, False], [False, False]])
    y = oracle_forward(x, weight, rows, cols, pos_weights, None, mask, 1.0, (1, 2))
    assert torch.equal(y, torch.tensor([[3.0 * (2 * 1 + 2 * 2), 0.0]], dtype=torch.float64))
    direct = splopa_linear_forward(x, weight, rows, cols, pos_weights, None, mask, 1.0)
    assert torch.equal(direct, y)


def test_reference_never_reads_a_pruned_block():
    case = build_case(SPLoPASpec(density=0.5))
    leaves = case.leaves(torch.float32)
    y = spa_kernels.splopa_linear(leaves["x"], leaves["weight"], leaves["prototype_rows"], leaves["prototype_cols"],
                                  leaves["pos_weights"], leaves["bias"], case.block_mask, backend="reference")
    assert leaves["weight"].isnan().any() and leaves["pos_weights"].isnan().any()
    assert not y.isnan().any()
