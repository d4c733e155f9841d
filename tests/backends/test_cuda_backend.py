"""The cuda backend against the reference on a GPU, forward and every gradient.

Cases are the other backends' awkward shapes (``_linear_cases``,
``_conv_cases``): sizes that are no multiple of any tile, primes, one row, rank
above the channel count, keep 1.0 / 0.5 / 0.1, everything pruned, one channel
kept, int32 and int64 index lists, non-contiguous inputs, the weight gradient.
Each case is built on the CPU, moved to the GPU, run through the public API on
``backend="cuda"`` (which checks that the cuda backend really ran), and
compared on the CPU with the float64 truth: fp32 within 1e-4 of the largest
value, bf16/fp16 at most twice PyTorch's own error in that dtype.  NaN planted
in every pruned entry must not reach any result.

Without a GPU, or where ``spa_kernels._C_cuda`` is not built, every test skips
and says why.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from support import conv_cases, linear_cases

from spa_kernels.backend import cuda as cuda_backend

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

if not torch.cuda.is_available():
    pytestmark = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
elif not cuda_backend.BUILT:
    pytestmark = pytest.mark.skip(reason=f"spa_kernels._C_cuda is not built: {cuda_backend.BUILD_ERROR}")


def _cuda(t):
    return None if t is None else t.cuda()


def _on_cpu(result: dict) -> dict:
    return {name: (None if t is None else t.detach().cpu()) for name, t in result.items()}


# --------------------------------------------------------------------------- linear

LINEAR_SPECS = {**linear_cases.SMALL_SPECS, **linear_cases.BIG_SPECS}


def _linear_on_gpu(case):
    return dataclasses.replace(
        case, x=case.x.cuda(), weight=case.weight.cuda(), lora_a=_cuda(case.lora_a), lora_b=_cuda(case.lora_b),
        bias=_cuda(case.bias), in_idx=_cuda(case.in_idx), out_idx=_cuda(case.out_idx), grad_out=case.grad_out.cuda(),
    )


def _check_linear(case, dtype: torch.dtype, label: str) -> None:
    expected = linear_cases.dense_oracle(case, rounded_to=dtype)
    yardstick = linear_cases.torch_low_precision(case, dtype) if dtype in linear_cases.LOW_PRECISION else None
    result = _on_cpu(linear_cases.run_api(_linear_on_gpu(case), dtype, "cuda"))
    linear_cases.check_results(f"cuda[{label}]", result, expected, dtype, yardstick)
    linear_cases.assert_pruned_exact_zero(f"cuda[{label}]", result, case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec_name", list(LINEAR_SPECS))
def test_linear_matches_reference(spec_name: str, dtype: torch.dtype) -> None:
    _check_linear(linear_cases.build_case(LINEAR_SPECS[spec_name]), dtype, spec_name)


@pytest.mark.parametrize("spec_name", ["basic", "weight-grad", "noncontiguous", "keep-0.1"])
def test_linear_never_reads_pruned_entries(spec_name: str) -> None:
    if spec_name not in LINEAR_SPECS:
        pytest.skip(f"no linear case named {spec_name!r}")
    clean = linear_cases.build_case(LINEAR_SPECS[spec_name])
    poisoned = linear_cases.poison_pruned(clean)
    result = _on_cpu(linear_cases.run_api(_linear_on_gpu(poisoned), torch.float32, "cuda"))
    expected = linear_cases.dense_oracle(clean, rounded_to=torch.float32)
    linear_cases.check_results(f"cuda-poisoned[{spec_name}]", result, expected, torch.float32)


# --------------------------------------------------------------------------- conv

CONV_SPECS = conv_cases.SPECS  # SPLoRA and SPPaRA, groups = 1 (grouped convs run on the reference only)


def _conv_on_gpu(case):
    return dataclasses.replace(
        case, tensors={name: _cuda(t) for name, t in case.tensors.items()}, in_idx=_cuda(case.in_idx),
        out_idx=_cuda(case.out_idx), grad_out=case.grad_out.cuda(),
    )


def _check_conv(case, dtype: torch.dtype, label: str) -> None:
    expected = conv_cases.reference_truth(case, dtype)
    yardstick = conv_cases.torch_low_precision(case, dtype) if dtype in linear_cases.LOW_PRECISION else None
    result = _on_cpu(conv_cases.run_api(_conv_on_gpu(case), dtype, "cuda"))
    linear_cases.check_results(f"cuda[{label}]", result, expected, dtype, yardstick)
    conv_cases.assert_pruned_exact_zero(f"cuda[{label}]", result, case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec_name", list(CONV_SPECS))
def test_conv_matches_reference(spec_name: str, dtype: torch.dtype) -> None:
    _check_conv(conv_cases.build_case(CONV_SPECS[spec_name]), dtype, spec_name)


@pytest.mark.parametrize("spec_name", ["2d-basic", "weight-grad", "3d-stride2-dilation2", "one-channel"])
def test_conv_never_reads_pruned_entries(spec_name: str) -> None:
    if spec_name not in CONV_SPECS:
        pytest.skip(f"no conv case named {spec_name!r}")
    clean = conv_cases.build_case(CONV_SPECS[spec_name])
    result = _on_cpu(conv_cases.run_api(_conv_on_gpu(conv_cases.poison_pruned(clean)), torch.float32, "cuda"))
    linear_cases.check_results(f"cuda-poisoned[{spec_name}]", result, conv_cases.reference_truth(clean, torch.float32),
                               torch.float32)
    conv_cases.assert_pruned_exact_zero(f"cuda-poisoned[{spec_name}]", result, clean)


# --------------------------------------------------------------------------- the binding's checks


def test_binding_rejects_bad_arguments_before_launching() -> None:
    x = torch.randn(4, 6, device="cuda")
    w = torch.randn(5, 6, device="cuda")
    with pytest.raises(ValueError, match="in_idx"):
        cuda_backend.splora_linear_forward(x, w, None, None, None, torch.arange(7, device="cuda"), None, 1.0)
    with pytest.raises(ValueError, match="weight"):
        cuda_backend.splora_linear_forward(x, w.double(), None, None, None, None, None, 1.0)
    with pytest.raises(ValueError, match="x"):
        cuda_backend.splora_linear_forward(x.double(), w.double(), None, None, None, None, None, 1.0)
    with pytest.raises(ValueError, match="weight"):
        cuda_backend.splora_linear_forward(x, w.cpu(), None, None, None, None, None, 1.0)
    with pytest.raises(ValueError, match="groups"):
        cuda_backend.splora_conv_forward(x, w, None, None, None, None, None, 1.0, (1,), (0,), (1,), 2)
