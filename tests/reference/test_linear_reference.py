"""The reference backend against an independent dense float64 computation.

The reference is the oracle of every other backend, so it is itself checked
against the dense formula ``y = x (mask ⊙ (W + s·B A))ᵀ + b ⊙ mask_out`` and
the gradients torch.autograd takes of it (see ``support.linear_cases.dense_oracle``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.linear_cases import (
    BIG_SPECS,
    LOW_PRECISION,
    SMALL_SPECS,
    LinearSpec,
    assert_pruned_exact_zero,
    build_case,
    check_results,
    dense_oracle,
    linear_specs,
    poison_pruned,
    run_api,
    torch_low_precision,
)

SPECS = {**SMALL_SPECS, **BIG_SPECS}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_reference_matches_dense_float64(spec_name, dtype):
    case = build_case(SPECS[spec_name])
    result = run_api(case, dtype, "reference")
    check_results(f"reference[{spec_name}]", result, dense_oracle(case, rounded_to=dtype), dtype)
    assert_pruned_exact_zero(f"reference[{spec_name}]", result, case)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize(
    "spec_name", ["basic", "nd-x", "rank-above-in", "weight-grad", "noncontiguous", "all-pruned", "big-keep0.5-weight-grad"]
)
def test_reference_low_precision(spec_name, dtype):
    case = build_case(SPECS[spec_name])
    result = run_api(case, dtype, "reference")
    expected = dense_oracle(case, rounded_to=dtype)
    check_results(f"reference[{spec_name}]", result, expected, dtype, torch_low_precision(case, dtype))
    assert_pruned_exact_zero(f"reference[{spec_name}]", result, case)


@pytest.mark.parametrize("spec_name", ["basic", "weight-grad", "nd-x", "keep-0.1", "one-channel", "big-keep0.1"])
def test_reference_never_reads_pruned_entries(spec_name):
    """NaN in every pruned entry (inputs and grad_out) changes nothing."""
    clean = build_case(SPECS[spec_name])
    poisoned = poison_pruned(clean)
    result = run_api(poisoned, torch.float64, "reference")
    check_results(f"reference-poisoned[{spec_name}]", result, dense_oracle(clean), torch.float64)
    assert_pruned_exact_zero(f"reference-poisoned[{spec_name}]", result, clean)


def test_reference_index_none_equals_every_index():
    """``None`` means all channels active: same result as passing arange."""
    spec = LinearSpec(keep_in=None, keep_out=None, grads=("x", "weight", "lora_a", "lora_b", "bias"))
    case = build_case(spec)
    every = dataclasses.replace(
        case, in_idx=torch.arange(spec.in_features), out_idx=torch.arange(spec.out_features)
    )
    with_none = run_api(case, torch.float64, "reference")
    with_all = run_api(every, torch.float64, "reference")
    for key in with_none:
        torch.testing.assert_close(with_none[key], with_all[key], rtol=1e-12, atol=0, msg=key)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_reference_random_cases(data):
    spec = data.draw(linear_specs(max_features=64, max_rows=48))
    seed = data.draw(st.integers(0, 2**16), label="seed")
    dtype = data.draw(st.sampled_from([torch.float64, torch.float32]), label="dtype")
    case = build_case(spec, seed)
    result = run_api(case, dtype, "reference")
    check_results("reference[random]", result, dense_oracle(case, rounded_to=dtype), dtype)
    assert_pruned_exact_zero("reference[random]", result, case)
