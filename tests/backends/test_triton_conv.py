"""The triton backend of the SPLoRA / SPPaRA convolutions, forward and every gradient.

The cases, the oracles and the tolerance rule are the shared harness of
``tests/support`` (``conv_cases`` on top of ``linear_cases``): each result is
checked against the dense float64 formula through ``torch.nn.functional.conv{d}d``
(independent of spa_kernels) and against the reference backend in float64, both
on the very inputs the run was given.  Tolerance, for linear and conv alike:
float32 within 1e-4 of the largest value; bfloat16 and float16 at most twice the
error of PyTorch's own computation in that dtype (plus a quarter ulp of the
largest value, so that an exact PyTorch result does not demand bit equality).

On a machine without a GPU the kernels run in Triton's interpreter
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports
Triton), which costs milliseconds per kernel operation, so cases are tiny: batch
at most 2, at most 10 channels (two 8-wide interpreter blocks with a ragged
tail), spatial sizes at most 7, and few 3-D or 5×5 cases.  Tests on CUDA tensors
use bigger shapes and skip themselves without a GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.conv_cases import (
    ALL_GRADS,
    ConvSpec,
    assert_pruned_exact_zero,
    build_case,
    dense_oracle,
    poison_pruned,
    reference_truth,
    run_api,
    torch_low_precision,
)
from support.linear_cases import LOW_PRECISION, check_results, max_error_report
from support.triton_support import compile_for_gpu, has_nvidia_compiler, run_without_interpreter

import spa_kernels
from spa_kernels.backend import triton as triton_backend

pytestmark = pytest.mark.skipif(not triton_backend.IMPORTED, reason="Triton is not installed")

CPU_RUNS = triton_backend.is_available("cpu", None)
CUDA_RUNS = torch.cuda.is_available() and triton_backend.is_available("cuda", None)
needs_interpreter = pytest.mark.skipif(not CPU_RUNS, reason="needs TRITON_INTERPRET=1 set before Triton's import")
needs_cuda = pytest.mark.skipif(not CUDA_RUNS, reason="needs a CUDA GPU")

# The shapes of this file: 7 outputs (a ragged 8-wide block), 5 positions, scale 0.5.
BASE = ConvSpec(out_channels=7, spatial=5, padding="same", scale=0.5)


def spec(**changes) -> ConvSpec:
    """``BASE`` with ``changes``; ``padding="same"`` needs stride 1, as in torch."""
    return dataclasses.replace(BASE, **changes)


def check(case, dtype: torch.dtype, device: str = "cpu") -> None:
    """Triton in ``dtype`` against the dense float64 oracle and the float64 reference; pruned entries zero."""
    got = run_api(case, dtype, "triton", device=device)
    yardstick = torch_low_precision(case, dtype, device) if dtype in LOW_PRECISION else None
    check_results("triton vs dense", got, dense_oracle(case, dtype), dtype, yardstick)
    check_results("triton vs reference", got, reference_truth(case, dtype), dtype, yardstick)
    assert_pruned_exact_zero("triton", got, case)


# --------------------------------------------------------------------------- interpreter (CPU)

# Shapes that break kernels: every geometry option alone, sizes that are not
# multiples of any block, batch 1, rank 1 and a rank above one rank block,
# keep 1.0/0.5/0.1, everything pruned, one channel.
SMALL = {
    "2d-3x3-same": spec(),
    "2d-3x3-pad0-weight-grad": spec(padding=0, grads=ALL_GRADS),
    "2d-stride2-weight-grad": spec(spatial=6, stride=2, padding=1, grads=ALL_GRADS),
    "2d-dilation2-same": spec(spatial=6, dilation=2),
    "2d-stride2-dilation2-pad0": spec(spatial=7, stride=2, dilation=2, padding=0, grads=ALL_GRADS),
    "2d-padding-beyond-centre": spec(spatial=4, stride=2, padding=3),
    "2d-stride-exceeds-input": spec(spatial=3, stride=4, padding=1, grads=ALL_GRADS),
    "2d-1x1-stride2": spec(spatial=5, kernel=1, stride=2, padding=0, grads=ALL_GRADS),
    "2d-5x5-batch1": spec(batch=1, in_channels=4, out_channels=5, spatial=5, kernel=5, grads=ALL_GRADS),
    "2d-per-dim-geometry": spec(spatial=(5, 6), kernel=(3, 1), stride=(1, 2), dilation=(2, 1), padding=(1, 0),
                                grads=ALL_GRADS),
    "1d-same": spec(d=1, spatial=7),
    "1d-stride3-dilation2": spec(d=1, spatial=7, kernel=5, stride=3, dilation=2, padding=1),
    "1d-stride4-dilation6-weight-grad": spec(d=1, spatial=7, stride=4, dilation=2, padding=3, grads=ALL_GRADS),
    "1d-k5-stride2-pad0-weight-grad": spec(d=1, spatial=7, kernel=5, stride=2, padding=0, grads=ALL_GRADS),
    "3d-3x3x3-batch1": spec(d=3, batch=1, in_channels=3, out_channels=4, spatial=3, grads=ALL_GRADS),
    "3d-per-dim-stride2": spec(d=3, batch=1, in_channels=4, out_channels=3, spatial=(3, 4, 5), kernel=(1, 3, 3),
                               stride=(1, 2, 2), padding=(0, 1, 0)),
    "channels10-keep1.0": spec(batch=1, in_channels=10, out_channels=10, keep_in=1.0, keep_out=1.0),
    "channels10-no-indices-weight-grad": spec(batch=1, in_channels=10, out_channels=9, keep_in=None, keep_out=None,
                                              grads=ALL_GRADS),
    "keep0.1": spec(in_channels=10, out_channels=10, keep_in=0.1, keep_out=0.1),
    "one-channel-rank1": spec(keep_in=1, keep_out=1, rank=1, grads=ALL_GRADS),
    "all-ones": spec(batch=1, in_channels=1, out_channels=1, spatial=1, kernel=1, padding=0, rank=1,
                     keep_in=None, keep_out=None),
    "rank17": spec(rank=17, spatial=4),
    "all-pruned": spec(keep_in=0.0, keep_out=0.0, grads=ALL_GRADS),
    "inputs-pruned": spec(keep_in=0.0, grads=ALL_GRADS),
    "outputs-pruned": spec(keep_out=0.0),
    "no-adapter-weight-grad": spec(rank=None, stride=2, padding=1, grads=ALL_GRADS),
    "no-adapter-no-bias": spec(rank=None, bias=False),
    "no-bias-negative-scale": spec(bias=False, scale=-2.5),
    "noncontiguous": spec(noncontiguous=True),
    "sppara-same": spec(kind="sppara"),
    "sppara-stride2-pad0-weight-grad": spec(kind="sppara", spatial=6, stride=2, padding=0, grads=ALL_GRADS),
    "sppara-padding-beyond-centre": spec(kind="sppara", spatial=4, stride=2, padding=3),
    "sppara-1d-dilation2": spec(kind="sppara", d=1, spatial=7, dilation=2, keep_in=1.0, keep_out=None),
    "sppara-3d-batch1": spec(kind="sppara", d=3, batch=1, in_channels=3, out_channels=4, spatial=3, stride=2,
                             padding=1),
    "sppara-5x5-no-bias": spec(kind="sppara", batch=1, in_channels=4, out_channels=5, kernel=5, bias=False),
    "sppara-all-pruned": spec(kind="sppara", keep_in=0.0, keep_out=0.0, grads=ALL_GRADS),
    "sppara-one-channel": spec(kind="sppara", in_channels=10, out_channels=10, keep_in=1, keep_out=1),
}

LOW_PRECISION_SMALL = ("2d-stride2-weight-grad", "1d-same", "rank17", "sppara-stride2-pad0-weight-grad")


@needs_interpreter
@pytest.mark.parametrize("name", list(SMALL))
def test_float32_matches_float64(name):
    check(build_case(SMALL[name]), torch.float32)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", LOW_PRECISION_SMALL)
def test_low_precision_within_twice_torch_error(name, dtype):
    check(build_case(SMALL[name]), dtype)


@needs_interpreter
@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    d=st.sampled_from([1, 2]),
    spatial=st.integers(1, 6),
    kernel=st.sampled_from([1, 3]),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 3),
    channels=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    rank=st.one_of(st.none(), st.integers(1, 4)),
    sppara=st.booleans(),
    keep=st.tuples(st.one_of(st.none(), st.floats(0.0, 1.0)), st.one_of(st.none(), st.floats(0.0, 1.0))),
    weight_grad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_cases_match_float64(d, spatial, kernel, stride, dilation, padding, channels, rank, sppara, keep,
                                    weight_grad, seed):
    spatial = max(spatial, dilation * (kernel - 1) + 1 - 2 * padding)  # at least one output position
    case_spec = spec(kind="sppara" if sppara else "splora", d=d, batch=1 + seed % 2, in_channels=channels[0],
                     out_channels=channels[1], spatial=spatial, kernel=kernel, stride=stride, dilation=dilation,
                     padding=padding, rank=rank, keep_in=keep[0], keep_out=keep[1],
                     grads=ALL_GRADS if weight_grad else BASE.grads)
    check(build_case(case_spec, seed=seed), torch.float32)


@needs_interpreter
def test_int32_indices_are_accepted():
    check(build_case(spec(in_index_dtype=torch.int32, out_index_dtype=torch.int32)), torch.float32)


def _float32(case) -> dict:
    return {name: None if value is None else value.float() for name, value in case.tensors.items()}


@needs_interpreter
@pytest.mark.parametrize("sppara", [False, True], ids=["splora", "sppara"])
@pytest.mark.parametrize("which", ["dx", "adapter-and-bias", "weight-and-bias", "all"])
def test_backward_returns_only_what_is_asked(which, sppara):
    """The backend entry point: None where not asked, the oracle's values where asked."""
    case_spec = spec(kind="sppara" if sppara else "splora", stride=2, spatial=6, padding=1, grads=ALL_GRADS)
    case = build_case(case_spec)
    names = case_spec.names
    asked = {
        "dx": {"x"},
        "adapter-and-bias": {"lora_a", "lora_b", "adapter", "bias"},
        "weight-and-bias": {"weight", "bias"},
        "all": set(names),
    }[which]
    output_mask = tuple(name in asked for name in names)
    t = _float32(case)
    grad_out = case.grad_out.float()
    geometry = ((2, 2), (1, 1), (1, 1), 1)
    if sppara:
        got = triton_backend.sppara_conv_backward(grad_out, t["x"], t["weight"], t["adapter"], case.in_idx,
                                                  case.out_idx, *geometry, output_mask)
    else:
        got = triton_backend.splora_conv_backward(grad_out, t["x"], t["weight"], t["lora_a"], t["lora_b"],
                                                  case.in_idx, case.out_idx, *geometry, case_spec.scale, output_mask)
    expected = dense_oracle(case, torch.float32)
    for name, want, grad in zip(names, output_mask, got, strict=True):
        if not want:
            assert grad is None, f"{name} gradient computed although not asked for"
            continue
        error, report = max_error_report(name, grad, expected[name])
        assert error <= 1e-4 * float(expected[name].abs().max()), report


@needs_interpreter
def test_frozen_weight_costs_no_weight_gradient_work(monkeypatch):
    """With W frozen, no kernel writes a weight-shaped tensor; with W trainable exactly one does."""
    from spa_kernels.backend.triton import conv_backward

    targets = []
    original = conv_backward.weight_grad

    def recording(left, left_idx, right, right_idx, out, shape, column_sum=None):
        targets.append(tuple(out.shape))
        return original(left, left_idx, right, right_idx, out, shape, column_sum)

    monkeypatch.setattr(conv_backward, "weight_grad", recording)
    frozen = spec(batch=1, in_channels=5, out_channels=4, rank=3)
    run_api(build_case(frozen), torch.float32, "triton")
    weight_shaped = (4, 5, 3, 3)
    assert weight_shaped not in targets and sorted(targets) == [(3, 5, 1, 1, 1), (4, 3, 1, 1, 1)]  # dA and dB
    targets.clear()
    run_api(build_case(dataclasses.replace(frozen, grads=ALL_GRADS)), torch.float32, "triton")
    assert targets.count((4, 5, 1, 3, 3)) == 1  # dW, seen with three spatial dims


@needs_interpreter
@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
def test_kernels_never_touch_inactive_outputs(transposed):
    """The implicit GEMM writes active channels only: NaN elsewhere stays NaN."""
    from spa_kernels.backend.triton import conv, conv_geometry

    case = build_case(spec(in_channels=9, out_channels=10, stride=2, spatial=6, padding=1, keep_in=0.3,
                           keep_out=0.3))
    t = _float32(case)
    grad_out = case.grad_out.float()
    shape = conv_geometry.conv_shape(t["x"], t["weight"], (2, 2), (1, 1), (1, 1))
    weight = conv_geometry.as_5d(t["weight"])
    if transposed:  # dx: active input channels written from the active outputs
        src, out, k_idx, n_idx, active_idx = grad_out, torch.full_like(t["x"], float("nan")), \
            case.out_idx, case.in_idx, case.in_idx
    else:
        src, out, k_idx, n_idx, active_idx = t["x"], torch.full_like(grad_out, float("nan")), \
            case.in_idx, case.out_idx, case.out_idx
        weight = weight.transpose(0, 1)
    conv.implicit_gemm(conv_geometry.as_5d(src), weight, k_idx, n_idx, conv_geometry.as_5d(out), shape,
                       transposed=transposed)
    active = torch.zeros(out.shape[1], dtype=torch.bool)
    active[active_idx] = True
    assert torch.isnan(out[:, ~active]).all()
    assert not torch.isnan(out[:, active]).any()


@needs_interpreter
@pytest.mark.parametrize("sppara", [False, True], ids=["splora", "sppara"])
def test_pruned_inputs_are_never_read(sppara):
    """NaN in every pruned entry of every operand (and of grad_out) leaves the result unchanged."""
    clean = build_case(spec(kind="sppara" if sppara else "splora", in_channels=8, out_channels=9, rank=3, stride=2,
                            spatial=6, padding=1, grads=ALL_GRADS))
    expected = run_api(clean, torch.float32, "triton")
    got = run_api(poison_pruned(clean), torch.float32, "triton")
    for key in expected:
        assert torch.equal(got[key], expected[key]), f"{key} changed when pruned entries hold NaN"


@needs_interpreter
def test_backend_checks_what_it_relies_on():
    """Shapes at the backend's entry; dtypes and groups, declared in its capabilities, at the op layer."""
    x, weight = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3)
    geometry = ((1, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="groups"):
        torch.ops.spa_kernels.splora_conv(x, weight, None, None, None, None, None, *map(list, geometry), 2, 1.0,
                                          "triton")
    with pytest.raises(ValueError, match="backend='triton' cannot run"):
        spa_kernels.splora_conv2d(x.double(), weight.double(), padding=1, backend="triton")
    with pytest.raises(ValueError, match="odd"):
        triton_backend.splora_conv_forward(x, torch.randn(6, 4, 2, 2), None, None, None, None, None, *geometry, 1,
                                           1.0)
    with pytest.raises(ValueError, match="adapter"):
        triton_backend.sppara_conv_forward(x, weight, torch.randn(6, 3), None, None, None, *geometry, 1)
    with pytest.raises(ValueError, match="values each"):
        triton_backend.splora_conv_forward(x, weight, None, None, None, None, None, (1,), (1,), (1,), 1, 1.0)
    with pytest.raises(ValueError, match="smaller than"):
        triton_backend.splora_conv_forward(x, torch.randn(6, 4, 7, 7), None, None, None, None, None,
                                           (1, 1), (0, 0), (1, 1), 1, 1.0)


@needs_interpreter
def test_auto_never_picks_the_interpreter():
    x, weight = torch.randn(1, 3, 4, 4), torch.randn(2, 3, 3, 3)
    from spa_kernels import backend as backend_policy

    assert backend_policy.resolve(None, x.device, x.dtype, op="splora_conv").name != "triton"
    spa_kernels.splora_conv2d(x, weight, padding=1)


# --------------------------------------------------------------------------- GPU code generation


def compile_every_conv_kernel_for_gpu(capabilities: tuple[int, ...]) -> None:
    """Compile each convolution kernel to a cubin for the given CUDA compute capabilities; no GPU needed.

    Runs in a process without ``TRITON_INTERPRET``, where the kernels are real
    JIT functions.  Variants: the implicit GEMM forward and transposed with every
    index and fused term on and the unit dims a conv2d launch specialises to
    constants; the rank pre-pass shape (one tap, everything off, 3-D); the
    weight-gradient kernel with everything on and off; the bias-gradient kernel.
    Small tiles keep compile time down: the code paths, not the tile sizes, are
    what can fail to lower.
    """
    from spa_kernels.backend.triton import conv, conv_backward, linear

    assert not conv.INTERPRETED, "kernels were decorated for the interpreter"

    def build(kernel, pointer_dtypes, constexprs, config, capability, ones=()):
        compile_for_gpu(kernel, pointer_dtypes, constexprs, config, capability, ones=ones)

    common = {"INPUT_PRECISION": "ieee", "IN_INTERPRETER": False}
    gemm_config = linear.autotune_config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, 4, 3)
    weight_grad_config = linear.autotune_config({"BLOCK_LEFT": 32, "BLOCK_RIGHT": 16, "BLOCK_M": 32}, 4, 3)
    conv2d_unit_dims = ("OUT_D", "SRC_D", "KERNEL_D", "CONV_STRIDE_D", "DIL_D", "stride_src_w", "stride_out_w")
    for capability in capabilities:
        for transposed in (False, True):
            build(
                conv.splora_conv_implicit_gemm_kernel,
                {"default": "bf16", "low_ptr": "fp32", "k_idx_ptr": "i64", "n_idx_ptr": "i64"},
                {**common, "SPATIAL_DIMS": 2, "TRANSPOSED": transposed, "HAS_K_IDX": True, "HAS_N_IDX": True,
                 "HAS_LOW_RANK": True, "HAS_ADAPTER": True, "HAS_BIAS": True, "BLOCK_R": 64, "GROUP": 8},
                gemm_config, capability, ones=conv2d_unit_dims,
            )
        build(
            conv.splora_conv_implicit_gemm_kernel,
            {"default": "fp32", "k_idx_ptr": "i64", "n_idx_ptr": "i64"},
            {**common, "SPATIAL_DIMS": 3, "TRANSPOSED": False, "HAS_K_IDX": False, "HAS_N_IDX": False,
             "HAS_LOW_RANK": False, "HAS_ADAPTER": False, "HAS_BIAS": False, "BLOCK_R": 16, "GROUP": 8},
            gemm_config, capability, ones=("TAPS", "KERNEL_D", "KERNEL_H", "KERNEL_W"),
        )
        for dtype, on in (("bf16", True), ("fp32", False)):
            build(
                conv_backward.splora_conv_weight_grad_kernel,
                {"default": dtype, "right_ptr": "fp32" if on else dtype, "left_idx_ptr": "i64",
                 "right_idx_ptr": "i64"},
                {**common, "SPATIAL_DIMS": 3 if on else 1, "HAS_LEFT_IDX": on, "HAS_RIGHT_IDX": not on,
                 "COLUMN_SUM": on, "GROUP": 8},
                weight_grad_config, capability,
            )
        build(
            conv_backward.splora_conv_bias_grad_kernel,
            {"default": "bf16", "idx_ptr": "i64"},
            {"HAS_IDX": True, "IN_INTERPRETER": False, "BLOCK_N": 32, "BLOCK_M": 256},
            None, capability,
        )




@pytest.mark.skipif(not has_nvidia_compiler(), reason="this Triton has no NVIDIA code generator")
def test_conv_kernels_compile_for_hopper_and_ampere():
    """What the interpreter cannot check: every kernel lowers through ptxas for sm_90 and sm_80."""
    done = run_without_interpreter(__file__, "compile_every_conv_kernel_for_gpu((90, 80))")
    assert done.returncode == 0, done.stderr[-4000:]


# --------------------------------------------------------------------------- CUDA

BIG = {
    "resnet-3x3": spec(batch=4, in_channels=64, out_channels=64, spatial=14, rank=8),
    "resnet-3x3-stride2-weight-grad": spec(batch=4, in_channels=96, out_channels=80, spatial=15, stride=2,
                                           padding=1, rank=8, grads=ALL_GRADS),
    "keep0.1": spec(batch=2, in_channels=128, out_channels=128, spatial=9, keep_in=0.1, keep_out=0.1, rank=16),
    "1x1-no-indices": spec(batch=3, in_channels=70, out_channels=130, spatial=11, kernel=1, padding=0,
                           keep_in=None, keep_out=None, rank=4),
    "5x5-dilation2": spec(batch=2, in_channels=33, out_channels=47, spatial=17, kernel=5, dilation=2, rank=5),
    "1d": spec(d=1, batch=4, in_channels=100, out_channels=90, spatial=61, kernel=5, stride=2, padding=2, rank=12,
               grads=ALL_GRADS),
    "3d": spec(d=3, batch=2, in_channels=24, out_channels=40, spatial=7, stride=(1, 2, 2), padding=1, rank=6),
    "sppara": spec(kind="sppara", batch=4, in_channels=64, out_channels=72, spatial=12, stride=2, padding=1,
                   grads=ALL_GRADS),
    "all-pruned": spec(batch=2, in_channels=64, out_channels=64, spatial=8, keep_in=0.0, keep_out=0.0,
                       grads=ALL_GRADS),
    "one-channel": spec(batch=2, in_channels=65, out_channels=65, spatial=9, keep_in=1, keep_out=1),
}


@needs_cuda
@pytest.mark.parametrize("name", list(BIG))
def test_cuda_bfloat16_matches_float64(name):
    check(build_case(BIG[name]), torch.bfloat16, device="cuda")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", ["resnet-3x3-stride2-weight-grad", "sppara", "3d"])
def test_cuda_other_dtypes_match_float64(name, dtype):
    check(build_case(BIG[name]), dtype, device="cuda")


@needs_cuda
@pytest.mark.parametrize("name", ["2d-stride-exceeds-input", "all-ones", "all-pruned", "rank17", "sppara-3d-batch1"])
def test_cuda_small_shapes(name):
    check(build_case(SMALL[name]), torch.bfloat16, device="cuda")
