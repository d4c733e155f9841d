"""The triton backend of ``splora_linear`` against the reference, forward and every gradient.

On a machine without a GPU the kernels run in Triton's interpreter
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports
Triton), so shapes stay small: at most 40 rows and 48 channels, which already
spans several 16-wide interpreter tiles with ragged tails.  Tests on CUDA
tensors use bigger shapes and skip themselves without a GPU.

Tolerances: the one rule of ``support.linear_cases.check_results``, against a
float64 computation of the same rounded inputs: float32 within 1e-4 of the
largest value; bfloat16 and float16 at most twice the error of PyTorch's own
computation in that dtype (the reference backend run in it), plus a quarter ulp
of the largest value.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.linear_cases import GRAD_NAMES, LOW_PRECISION, check_only_asked, check_results
from support.triton_support import (
    compile_for_gpu,
    has_nvidia_compiler,
    random_indices,
    run_without_interpreter,
)
from torch import Tensor

import spa_kernels
from spa_kernels.backend import triton as triton_backend

pytestmark = pytest.mark.skipif(not triton_backend.IMPORTED, reason="Triton is not installed")

CPU_RUNS = triton_backend.is_available("cpu", None)
CUDA_RUNS = torch.cuda.is_available() and triton_backend.is_available("cuda", None)
needs_interpreter = pytest.mark.skipif(not CPU_RUNS, reason="needs TRITON_INTERPRET=1 set before Triton's import")
needs_cuda = pytest.mark.skipif(not CUDA_RUNS, reason="needs a CUDA GPU")



# --------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Spec:
    """A case: ``keep_*`` is None (index None), a fraction, or an int count of active channels."""

    rows: int = 9
    in_features: int = 13
    out_features: int = 21
    rank: int | None = 4
    keep_in: float | int | None = 0.5
    keep_out: float | int | None = 0.5
    bias: bool = True
    scale: float = 0.5
    weight_grad: bool = False
    noncontiguous_x: bool = False
    lead: tuple[int, ...] = ()  # extra leading dims of x before ``rows``




@dataclasses.dataclass
class Case:
    spec: Spec
    tensors: dict[str, Tensor | None]  # masters in the run's dtype
    grad_out: Tensor
    in_idx: Tensor | None
    out_idx: Tensor | None


def make_case(spec: Spec, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> Case:
    """Random inputs rounded to ``dtype``; the adapter term is as large as the base term."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype).to(device)

    n_in, n_out = spec.in_features, spec.out_features
    tensors = {
        "x": randn(*spec.lead, spec.rows, n_in),
        "weight": randn(n_out, n_in, std=n_in**-0.5),
        "lora_a": randn(spec.rank, n_in, std=n_in**-0.5) if spec.rank else None,
        "lora_b": randn(n_out, spec.rank, std=spec.rank**-0.5) if spec.rank else None,
        "bias": randn(n_out) if spec.bias else None,
    }
    in_idx = random_indices(spec.keep_in, n_in, gen)
    out_idx = random_indices(spec.keep_out, n_out, gen)
    grad_out = randn(*spec.lead, spec.rows, n_out)
    return Case(
        spec, tensors, grad_out,
        None if in_idx is None else in_idx.to(device),
        None if out_idx is None else out_idx.to(device),
    )


def run(case: Case, backend: str, dtype: torch.dtype) -> dict[str, Tensor]:
    """Forward and gradients through the public API and autograd, all cast to ``dtype``."""
    leaves = {}
    for name, master in case.tensors.items():
        wanted = name != "weight" or case.spec.weight_grad
        leaves[name] = None if master is None else master.to(dtype).detach().requires_grad_(wanted)
    x = leaves["x"]
    if case.spec.noncontiguous_x:  # same values, column-major memory
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not x.is_contiguous()
    y = spa_kernels.splora_linear(
        x, leaves["weight"], leaves["lora_a"], leaves["lora_b"], leaves["bias"],
        case.in_idx, case.out_idx, scale=case.spec.scale, backend=backend,
    )
    assert y.dtype == dtype and y.shape == case.grad_out.shape
    y.backward(case.grad_out.to(dtype))
    result = {"y": y.detach()}
    for name, leaf in leaves.items():
        if leaf is not None and leaf.requires_grad:
            result[name] = leaf.grad
    if not case.spec.weight_grad:
        assert leaves["weight"].grad is None
    return result




def check(case: Case, dtype: torch.dtype) -> None:
    """Triton in ``dtype`` against the float64 reference, with the tolerance rule of ``support.linear_cases``.

    Low precision: the yardstick is PyTorch's own computation in ``dtype`` (the
    reference backend run in it).
    """
    got = run(case, "triton", dtype)
    exact = run(case, "reference", torch.float64)
    yardstick = run(case, "reference", dtype) if dtype in LOW_PRECISION else None
    check_results("triton", {key: value.cpu() for key, value in got.items()},
                  {key: value.cpu() for key, value in exact.items()}, dtype,
                  None if yardstick is None else {key: value.cpu() for key, value in yardstick.items()})
    failures = _pruned_entries_not_zero(case, got)
    assert not failures, "\n".join(failures)


def _pruned_entries_not_zero(case: Case, result: dict[str, Tensor]) -> list[str]:
    spec = case.spec

    def mask(idx, size):
        m = torch.ones(size, dtype=torch.bool, device=case.grad_out.device)
        if idx is not None:
            m[:] = False
            m[idx] = True
        return m

    in_pruned, out_pruned = ~mask(case.in_idx, spec.in_features), ~mask(case.out_idx, spec.out_features)
    where = {
        "y": (Ellipsis, out_pruned),
        "x": (Ellipsis, in_pruned),
        "lora_a": (slice(None), in_pruned),
        "lora_b": (out_pruned,),
        "bias": (out_pruned,),
        "weight": (out_pruned[:, None] | in_pruned[None, :],),
    }
    return [
        f"{key} is non-zero at {int((result[key][at] != 0).sum())} pruned entries"
        for key, at in where.items()
        if key in result and bool((result[key][at] != 0).any())
    ]


# Shapes that break kernels: not multiples of 16, 1, primes, batch 1, rank 1 and
# a rank above one block, keep 1.0/0.5/0.1, everything pruned, one channel.
SMALL = {
    "primes": Spec(rows=37, in_features=43, out_features=41, rank=5),
    "primes-weight-grad": Spec(rows=23, in_features=29, out_features=47, rank=3, weight_grad=True),
    "all-ones": Spec(rows=1, in_features=1, out_features=1, rank=1, keep_in=None, keep_out=None),
    "batch1-rank1-keep1.0": Spec(rows=1, in_features=17, out_features=13, rank=1, keep_in=1.0, keep_out=1.0),
    "no-indices-weight-grad": Spec(rows=18, in_features=20, out_features=33, keep_in=None, keep_out=None,
                                   weight_grad=True),
    "keep0.1-rank20": Spec(rows=40, in_features=48, out_features=48, rank=20, keep_in=0.1, keep_out=0.1),
    "keep1.0-out-only": Spec(rows=17, in_features=31, out_features=19, keep_in=None, keep_out=1.0),
    "all-pruned": Spec(keep_in=0.0, keep_out=0.0, weight_grad=True),
    "inputs-pruned": Spec(rows=5, keep_in=0.0, weight_grad=True),
    "outputs-pruned": Spec(rows=5, keep_out=0.0),
    "one-channel": Spec(rows=6, in_features=29, out_features=23, keep_in=1, keep_out=1, weight_grad=True),
    "no-adapter": Spec(rows=19, rank=None, keep_in=0.5, keep_out=0.5, weight_grad=True),
    "no-adapter-no-bias": Spec(rank=None, bias=False),
    "no-bias-negative-scale": Spec(bias=False, scale=-2.5),
    "noncontiguous-x": Spec(rows=21, in_features=19, out_features=35, noncontiguous_x=True),
    "3d-x": Spec(rows=5, lead=(3,), in_features=22, out_features=18, rank=2),
}

LOW_PRECISION_SMALL = ("primes-weight-grad", "keep0.1-rank20", "no-adapter", "noncontiguous-x")


# --------------------------------------------------------------------------- interpreter (CPU)


@needs_interpreter
@pytest.mark.parametrize("name", list(SMALL))
def test_float32_matches_reference(name):
    check(make_case(SMALL[name], torch.float32), torch.float32)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", LOW_PRECISION_SMALL)
def test_low_precision_within_twice_torch_error(name, dtype):
    check(make_case(SMALL[name], dtype), dtype)


@needs_interpreter
@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    rows=st.integers(1, 24),
    in_features=st.integers(1, 40),
    out_features=st.integers(1, 40),
    rank=st.one_of(st.none(), st.integers(1, 20)),
    keep_in=st.one_of(st.none(), st.floats(0.0, 1.0)),
    keep_out=st.one_of(st.none(), st.floats(0.0, 1.0)),
    bias=st.booleans(),
    weight_grad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_cases_match_reference(rows, in_features, out_features, rank, keep_in, keep_out, bias,
                                      weight_grad, seed):
    spec = Spec(rows=rows, in_features=in_features, out_features=out_features, rank=rank,
                keep_in=keep_in, keep_out=keep_out, bias=bias, weight_grad=weight_grad)
    check(make_case(spec, torch.float32, seed=seed), torch.float32)


@needs_interpreter
def test_int32_indices_are_accepted():
    case = make_case(Spec(rows=7, in_features=20, out_features=18), torch.float32)
    case.in_idx, case.out_idx = case.in_idx.int(), case.out_idx.int()
    check(case, torch.float32)


@needs_interpreter
@pytest.mark.parametrize(
    "output_mask",
    [(True, False, False, False, False), (False, False, True, True, True), (False, True, False, False, True),
     (True, True, True, True, True)],
    ids=["dx", "adapter-and-bias", "weight-and-bias", "all"],
)
def test_backward_returns_only_what_is_asked(output_mask):
    """The backend entry point: None where not asked, the reference's values where asked."""
    case = make_case(Spec(rows=11, in_features=18, out_features=20), torch.float32)
    t = case.tensors
    args = (case.grad_out, t["x"], t["weight"], t["lora_a"], t["lora_b"], case.in_idx, case.out_idx, 0.5)
    got = triton_backend.splora_linear_backward(*args, output_mask)
    expected = spa_kernels.backend.reference.splora_linear_backward(*args, output_mask)
    check_only_asked(GRAD_NAMES, output_mask, got, expected)


@needs_interpreter
def test_frozen_weight_costs_no_weight_gradient_work(monkeypatch):
    """With W frozen, no kernel writes a weight-shaped tensor; with W trainable exactly one does."""
    from spa_kernels.backend.triton import linear_backward

    targets = []
    original = linear_backward.gathered_tn

    def recording(left, left_idx, right, right_idx, out, column_sum=None):
        targets.append(tuple(out.shape))
        return original(left, left_idx, right, right_idx, out, column_sum)

    monkeypatch.setattr(linear_backward, "gathered_tn", recording)
    spec = Spec(rows=9, in_features=14, out_features=10, rank=3)
    run(make_case(spec, torch.float32), "triton", torch.float32)
    assert (10, 14) not in targets and sorted(targets) == [(10, 3), (14, 3)]  # dB and dAᵀ only
    targets.clear()
    run(make_case(dataclasses.replace(spec, weight_grad=True), torch.float32), "triton", torch.float32)
    assert targets.count((10, 14)) == 1


@needs_interpreter
def test_kernels_never_touch_inactive_outputs():
    """The gathered matmul writes active columns only: NaN elsewhere stays NaN."""
    from spa_kernels.backend.triton.linear import gathered_matmul

    case = make_case(Spec(rows=20, in_features=35, out_features=37, keep_in=0.3, keep_out=0.3), torch.float32)
    t = case.tensors
    out = torch.full((20, 37), float("nan"))
    gathered_matmul(t["x"], t["weight"].t(), case.in_idx, case.out_idx, out, bias=t["bias"])
    active = torch.zeros(37, dtype=torch.bool)
    active[case.out_idx] = True
    assert torch.isnan(out[:, ~active]).all()
    expected = spa_kernels.backend.reference.splora_linear_forward(
        t["x"], t["weight"], None, None, t["bias"], case.in_idx, case.out_idx, 1.0
    )
    torch.testing.assert_close(out[:, active], expected[:, active], rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_pruned_inputs_are_never_read():
    """NaN in every pruned entry of every operand leaves the result unchanged."""
    spec = Spec(rows=13, in_features=26, out_features=30, rank=3, weight_grad=True)
    clean = make_case(spec, torch.float32)
    poisoned = make_case(spec, torch.float32)
    in_pruned = torch.ones(spec.in_features, dtype=torch.bool)
    in_pruned[clean.in_idx] = False
    out_pruned = torch.ones(spec.out_features, dtype=torch.bool)
    out_pruned[clean.out_idx] = False
    nan = float("nan")
    p = poisoned.tensors
    p["x"][:, in_pruned] = nan
    p["weight"][out_pruned] = nan
    p["weight"][:, in_pruned] = nan
    p["lora_a"][:, in_pruned] = nan
    p["lora_b"][out_pruned] = nan
    p["bias"][out_pruned] = nan
    poisoned.grad_out[:, out_pruned] = nan
    expected = run(clean, "triton", torch.float32)
    got = run(poisoned, "triton", torch.float32)
    for key in expected:
        assert torch.equal(got[key], expected[key]), f"{key} changed when pruned entries hold NaN"


@needs_interpreter
def test_opcheck_on_the_triton_backend():
    """Schema, fake kernel, autograd registration and AOT tracing hold with these kernels."""
    case = make_case(Spec(rows=5, in_features=7, out_features=6, rank=2), torch.float32)
    t = case.tensors
    x, lora_a, lora_b, bias = (t[name].clone().requires_grad_() for name in ("x", "lora_a", "lora_b", "bias"))
    ops = torch.ops.spa_kernels
    torch.library.opcheck(
        ops.splora_linear.default, (x, t["weight"], lora_a, lora_b, bias, case.in_idx, case.out_idx, 0.5, "triton")
    )
    torch.library.opcheck(
        ops.splora_linear_backward.default,
        (case.grad_out, t["x"], t["weight"], t["lora_a"], t["lora_b"], case.in_idx, case.out_idx, 0.5, "triton",
         [True, True, True, True, True]),
    )


@needs_interpreter
def test_backend_is_listed_for_cpu_under_the_interpreter():
    assert "triton" in spa_kernels.backends("cpu")
    assert triton_backend.is_available("cpu", torch.bfloat16)
    assert not triton_backend.is_available("cpu", torch.float64)


def test_cpu_tensors_without_the_interpreter_raise(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "triton" not in spa_kernels.backends("cpu")
    assert not triton_backend.is_available("cpu", torch.float32)
    x, weight = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="triton"):
        spa_kernels.splora_linear(x, weight, backend="triton")


@needs_interpreter
def test_unsupported_dtype_raises():
    x, weight = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="triton"):
        spa_kernels.splora_linear(x, weight, backend="triton")


@needs_interpreter
def test_auto_never_picks_the_interpreter():
    x, weight = torch.randn(3, 4), torch.randn(5, 4)
    from spa_kernels import backend as backend_policy

    assert backend_policy.resolve(None, x.device, x.dtype).name != "triton"
    spa_kernels.splora_linear(x, weight)


# --------------------------------------------------------------------------- GPU code generation


def compile_every_kernel_for_gpu(capabilities: tuple[int, ...]) -> None:
    """Compile each kernel to a cubin for the given CUDA compute capabilities; no GPU needed.

    Runs in a process without ``TRITON_INTERPRET``, where the kernels are real
    JIT functions.  Two variants per kernel: bf16 with every index and fused
    term on and the largest autotune config, fp32 with all off and the smallest.
    """
    from spa_kernels.backend.triton import linear, linear_backward

    assert not linear.INTERPRETED, "kernels were decorated for the interpreter"

    def build(kernel, pointer_dtypes, constexprs, config, capability):
        compile_for_gpu(kernel, pointer_dtypes, constexprs, config, capability, divisible_sizes=True)

    common = {"INPUT_PRECISION": "ieee", "IN_INTERPRETER": False}
    for capability in capabilities:
        for dtype, on, pick in (("bf16", True, 0), ("fp32", False, -1)):
            build(
                linear.splora_gathered_matmul_kernel,
                {"default": dtype, "low_ptr": "fp32", "k_idx_ptr": "i64", "n_idx_ptr": "i64"},
                {**common, "HAS_K_IDX": on, "HAS_N_IDX": on, "HAS_LOW_RANK": on, "HAS_BIAS": on,
                 "BLOCK_R": 64 if on else 16, "GROUP": 8},
                linear._matmul_configs()[pick], capability,
            )
            build(
                linear.splora_rank_product_kernel,
                {"default": dtype, "out_ptr": "fp32", "idx_ptr": "i64"},
                {**common, "HAS_IDX": on, "BLOCK_R": 64 if on else 16},
                linear._rank_product_configs()[pick], capability,
            )
            build(
                linear_backward.splora_gathered_tn_kernel,
                {"default": dtype, "right_ptr": "fp32" if on else dtype, "left_idx_ptr": "i64",
                 "right_idx_ptr": "i64"},
                {**common, "HAS_LEFT_IDX": on, "HAS_RIGHT_IDX": not on, "COLUMN_SUM": on, "GROUP": 8},
                linear_backward._tn_configs()[pick], capability,
            )
            build(
                linear_backward.splora_bias_grad_kernel,
                {"default": dtype, "idx_ptr": "i64"},
                {"HAS_IDX": on, "IN_INTERPRETER": False, "BLOCK_N": 128, "BLOCK_M": 64},
                None, capability,
            )




@pytest.mark.skipif(not has_nvidia_compiler(), reason="this Triton has no NVIDIA code generator")
def test_kernels_compile_for_hopper_and_ampere():
    """What the interpreter cannot check: every kernel lowers through ptxas for sm_90 and sm_80."""
    done = run_without_interpreter(__file__, "compile_every_kernel_for_gpu((90, 80))")
    assert done.returncode == 0, done.stderr[-4000:]


# --------------------------------------------------------------------------- CUDA

BIG = {
    "keep1.0": Spec(rows=300, in_features=200, out_features=300, rank=16, keep_in=1.0, keep_out=1.0),
    "keep0.5-weight-grad": Spec(rows=333, in_features=257, out_features=301, rank=16, weight_grad=True),
    "keep0.1": Spec(rows=300, in_features=200, out_features=300, rank=16, keep_in=0.1, keep_out=0.1),
    "no-indices-rank1": Spec(rows=97, in_features=130, out_features=67, rank=1, keep_in=None, keep_out=None),
    "rank100-noncontiguous": Spec(rows=257, in_features=130, out_features=97, rank=100, noncontiguous_x=True),
    "no-adapter-3d": Spec(rows=50, lead=(4,), in_features=384, out_features=192, rank=None, weight_grad=True),
    "all-pruned": Spec(rows=64, in_features=64, out_features=64, keep_in=0.0, keep_out=0.0, weight_grad=True),
    "one-channel": Spec(rows=129, in_features=129, out_features=129, keep_in=1, keep_out=1),
    "vit-mlp": Spec(rows=1576, in_features=768, out_features=3072, rank=16),
}


@needs_cuda
@pytest.mark.parametrize("name", list(BIG))
def test_cuda_bfloat16_matches_reference(name):
    check(make_case(BIG[name], torch.bfloat16, device="cuda"), torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", ["keep0.5-weight-grad", "rank100-noncontiguous"])
def test_cuda_other_dtypes_match_reference(name, dtype):
    check(make_case(BIG[name], dtype, device="cuda"), dtype)


@needs_cuda
@pytest.mark.parametrize("name", ["primes-weight-grad", "all-ones", "all-pruned", "one-channel", "3d-x"])
def test_cuda_small_shapes(name):
    check(make_case(SMALL[name], torch.bfloat16, device="cuda"), torch.bfloat16)


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_runs_on_the_tensors_device():
    case = make_case(SMALL["primes"], torch.float32, device="cuda:1")
    check(case, torch.float32)


@needs_cuda
@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(1, 300),
    in_features=st.integers(1, 300),
    out_features=st.integers(1, 300),
    rank=st.one_of(st.none(), st.integers(1, 80)),
    keep_in=st.one_of(st.none(), st.floats(0.0, 1.0)),
    keep_out=st.one_of(st.none(), st.floats(0.0, 1.0)),
    weight_grad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cuda_random_cases(rows, in_features, out_features, rank, keep_in, keep_out, weight_grad, seed):
    spec = Spec(rows=rows, in_features=in_features, out_features=out_features, rank=rank,
                keep_in=keep_in, keep_out=keep_out, weight_grad=weight_grad)
    check(make_case(spec, torch.bfloat16, device="cuda", seed=seed), torch.bfloat16)
