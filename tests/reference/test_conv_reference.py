"""The reference convolutions against an independent dense float64 computation.

The reference backend is the oracle of every other backend, so it is itself
checked against the dense masked formula (effective weight with the adapter at
the centre tap, masks, ``torch.nn.functional.conv{d}d``) and the gradients
torch.autograd takes of it (see ``support.conv_cases.dense_oracle``).  Grouped and
depthwise convolutions run here only, and under auto selection with a warning.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.conv_cases import (
    ALL_GRADS,
    GROUPED_SPECS,
    SPECS,
    ConvSpec,
    assert_pruned_exact_zero,
    build_case,
    conv_specs,
    dense_oracle,
    poison_pruned,
    run_api,
    torch_low_precision,
)
from support.linear_cases import LOW_PRECISION, check_results

import spa_kernels
from spa_kernels.backend.reference import conv as reference_conv
from spa_kernels.backend.reference import conv_grouped
from spa_kernels.functional import conv as functional_conv

ALL_SPECS = {**SPECS, **GROUPED_SPECS}


def _check_reference(spec_name: str, case, dtype: torch.dtype) -> None:
    result = run_api(case, dtype, "reference")
    yardstick = torch_low_precision(case, dtype) if dtype in LOW_PRECISION else None
    check_results(f"reference[{spec_name}]", result, dense_oracle(case, rounded_to=dtype), dtype, yardstick)
    assert_pruned_exact_zero(f"reference[{spec_name}]", result, case)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("spec_name", list(ALL_SPECS))
def test_reference_matches_dense_float64(spec_name, dtype):
    _check_reference(spec_name, build_case(ALL_SPECS[spec_name]), dtype)


LOW_PRECISION_SPECS = [
    "2d-basic", "1d-basic", "3d-basic", "2d-stride2", "2d-same-dilation2", "2d-5x5-stride2", "all-pruned",
    "noncontiguous", "weight-grad", "rank-above-in", "sppara-2d-basic", "sppara-weight-grad", "grouped-2",
    "depthwise",
]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("spec_name", LOW_PRECISION_SPECS)
def test_reference_low_precision(spec_name, dtype):
    _check_reference(spec_name, build_case(ALL_SPECS[spec_name]), dtype)


@pytest.mark.parametrize(
    "spec_name",
    ["2d-basic", "weight-grad", "3d-stride2-dilation2", "keep-0.1", "one-channel", "2d-padding-beyond-centre",
     "sppara-weight-grad", "grouped-weight-grad", "sppara-grouped", "depthwise"],
)
def test_reference_never_reads_pruned_entries(spec_name):
    """NaN in every pruned entry (inputs and grad_out) changes nothing."""
    clean = build_case(ALL_SPECS[spec_name])
    result = run_api(poison_pruned(clean), torch.float64, "reference")
    check_results(f"reference-poisoned[{spec_name}]", result, dense_oracle(clean), torch.float64)
    assert_pruned_exact_zero(f"reference-poisoned[{spec_name}]", result, clean)


@pytest.mark.parametrize("kind", ["splora", "sppara"])
def test_reference_index_none_equals_every_index(kind):
    """``None`` means all channels active: same result as passing arange."""
    spec = ConvSpec(kind=kind, keep_in=None, keep_out=None, grads=ALL_GRADS, stride=2)
    case = build_case(spec)
    every = dataclasses.replace(case, in_idx=torch.arange(spec.in_channels), out_idx=torch.arange(spec.out_channels))
    with_none = run_api(case, torch.float64, "reference")
    with_all = run_api(every, torch.float64, "reference")
    for key in with_none:
        torch.testing.assert_close(with_none[key], with_all[key], rtol=1e-12, atol=0, msg=key)


@pytest.mark.parametrize("kind", ["splora", "sppara"])
def test_masked_grouped_formulation_with_one_group_equals_active_block(kind):
    """The two reference formulations (conv.py, conv_grouped.py) agree where both apply: groups = 1."""
    case = build_case(ConvSpec(kind=kind, grads=ALL_GRADS, stride=2, dilation=2, padding=2, spatial=9))
    t = {name: None if v is None else v.detach() for name, v in case.leaves(torch.float64).items()}
    geometry = ((2, 2), (2, 2), (2, 2), 1)
    in_idx, out_idx = case.in_idx.long(), case.out_idx.long()
    results = []
    for module in (reference_conv, conv_grouped):
        if kind == "splora":
            y = module.splora_conv_forward(t["x"], t["weight"], t["lora_a"], t["lora_b"], t["bias"], in_idx,
                                           out_idx, *geometry, 0.5)
            grads = module.splora_conv_backward(case.grad_out, t["x"], t["weight"], t["lora_a"], t["lora_b"],
                                                in_idx, out_idx, *geometry, 0.5, (True,) * 5)
        else:
            y = module.sppara_conv_forward(t["x"], t["weight"], t["adapter"], t["bias"], in_idx, out_idx, *geometry)
            grads = module.sppara_conv_backward(case.grad_out, t["x"], t["weight"], t["adapter"], in_idx, out_idx,
                                                *geometry, (True,) * 4)
        results.append((y, *grads))
    for name, active_block, masked in zip(("y", *case.spec.names), *results, strict=True):
        torch.testing.assert_close(masked, active_block, rtol=1e-12, atol=1e-12, msg=name)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_reference_random_cases(data):
    spec = data.draw(conv_specs(groups=True), label="spec")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    dtype = data.draw(st.sampled_from([torch.float64, torch.float32]), label="dtype")
    _check_reference("random", build_case(spec, seed), dtype)


# --------------------------------------------------------------------------- grouped under auto


@pytest.fixture
def fresh_grouped_warning(monkeypatch):
    """Forget that the one-time grouped warning was given, and clear any forced backend."""
    monkeypatch.setattr(functional_conv, "_grouped_warning_given", False)
    monkeypatch.delenv("SPA_KERNELS_BACKEND", raising=False)


@pytest.mark.parametrize("spec_name", ["grouped-2", "depthwise", "sppara-depthwise"])
def test_grouped_auto_runs_reference_with_one_warning(fresh_grouped_warning, spec_name):
    case = build_case(GROUPED_SPECS[spec_name])
    with pytest.warns(UserWarning, match="grouped/depthwise convolutions .* reference backend"):
        result = run_api(case, torch.float64, None, expected_backend="reference")
    check_results(f"auto-grouped[{spec_name}]", result, dense_oracle(case), torch.float64)
    with warnings.catch_warnings():  # once per process: the second call is silent
        warnings.simplefilter("error")
        run_api(case, torch.float64, "auto", expected_backend="reference")


def test_grouped_explicit_reference_does_not_warn(fresh_grouped_warning):
    case = build_case(GROUPED_SPECS["grouped-2"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_api(case, torch.float64, "reference")
        with spa_kernels.use_backend("reference"):
            run_api(case, torch.float64, None, expected_backend="reference")
