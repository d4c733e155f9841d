"""The triton backend of ``splopa_linear``: what the shared backend suite does not check.

``test_splopa_backends.py`` compares this backend with the float64 oracle and the
reference on its interpreter cases.  Here: the active-block lists the kernels
iterate, the backward entry point returning only what is asked, no weight
gradient work for a frozen weight, random shapes, code generation for sm_80 and
sm_90, and (on a GPU) larger shapes in bf16, fp16 and fp32.

On a machine without a GPU the kernels run in Triton's interpreter
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1``), so shapes stay small.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.linear_cases import check_only_asked
from support.splopa_cases import GRAD_NAMES, SPLoPASpec, build_case, check_against_oracle, random_specs
from support.triton_support import compile_for_gpu, has_nvidia_compiler, run_without_interpreter

import spa_kernels
from spa_kernels.backend import triton as triton_backend

pytestmark = pytest.mark.skipif(not triton_backend.IMPORTED, reason="Triton is not installed")

CPU_RUNS = triton_backend.is_available("cpu", None)
CUDA_RUNS = torch.cuda.is_available() and triton_backend.is_available("cuda", None)
needs_interpreter = pytest.mark.skipif(not CPU_RUNS, reason="needs TRITON_INTERPRET=1 set before Triton's import")
needs_cuda = pytest.mark.skipif(not CUDA_RUNS, reason="needs a CUDA GPU")



def _operands(spec: SPLoPASpec, seed: int = 0):
    case = build_case(spec, seed)
    leaves = case.leaves(torch.float32)
    x, weight, rows, cols, pos_weights, _ = (None if leaves[n] is None else leaves[n].detach() for n in GRAD_NAMES)
    grad_out = torch.randn(x.shape[0], weight.shape[0], generator=torch.Generator().manual_seed(seed + 1))
    return case, (grad_out, x, weight, rows, cols, pos_weights, case.block_mask)


# --------------------------------------------------------------------------- interpreter (CPU)


@pytest.mark.parametrize("transposed", [False, True], ids=["by-row", "by-column"])
def test_active_block_lists_hold_each_groups_active_blocks_in_order(transposed):
    from spa_kernels.backend.triton.splopa import active_block_lists

    mask = torch.rand(7, 5, generator=torch.Generator().manual_seed(3)) < 0.4
    mask[2] = False
    mask[:, 1] = True
    grouped = mask.t() if transposed else mask
    lists = active_block_lists(mask, *grouped.shape, mask.device, transposed=transposed)
    assert lists.blocks.dtype == torch.int32 and lists.counts.dtype == torch.int32
    assert lists.blocks.stride(1) == 1, "the kernels step through a group's list with unit stride"
    for group in range(grouped.shape[0]):
        active = grouped[group].nonzero().flatten().tolist()
        assert int(lists.counts[group]) == len(active)
        assert lists.blocks[group, :len(active)].tolist() == active

    every = active_block_lists(None, 3, 4, mask.device)
    assert every.counts.tolist() == [4, 4, 4]
    assert every.blocks.tolist() == [[0, 1, 2, 3]] * 3


@needs_interpreter
@pytest.mark.parametrize(
    "output_mask",
    [(True, False, False, False, False, False), (False, True, False, False, False, True),
     (False, False, True, False, True, False), (False, False, False, True, False, False),
     (True, True, True, True, True, True)],
    ids=["dx", "weight-and-bias", "rows-and-phi", "cols", "all"],
)
def test_backward_returns_only_what_is_asked(output_mask):
    """The backend entry point: None where not asked, the reference's values where asked."""
    _, args = _operands(SPLoPASpec(lead=(11,), block_shape=(4, 4), block_rows=4, block_cols=5))
    got = triton_backend.splopa_linear_backward(*args, 0.7, output_mask)
    expected = spa_kernels.backend.reference.splopa_linear_backward(*args, 0.7, output_mask)
    check_only_asked(GRAD_NAMES, output_mask, got, expected)


@needs_interpreter
def test_frozen_weight_costs_no_weight_gradient_work(monkeypatch):
    """The per-block gradient kernel writes dW only when asked, and does not run for dx and db alone."""
    from spa_kernels.backend.triton import splopa_backward

    calls = []
    original = splopa_backward.block_gradients

    def recording(grad_out, x, lists, block_shape, most_active, stack, grad_weight):
        calls.append((stack is not None, grad_weight is not None))
        return original(grad_out, x, lists, block_shape, most_active, stack, grad_weight)

    monkeypatch.setattr(splopa_backward, "block_gradients", recording)
    _, args = _operands(SPLoPASpec(block_shape=(4, 4)))
    splopa_backward.splopa_linear_backward(*args, 0.7, (True, False, True, True, True, True))
    assert calls == [(True, False)]
    calls.clear()
    splopa_backward.splopa_linear_backward(*args, 0.7, (True, False, False, False, False, True))
    assert calls == []
    splopa_backward.splopa_linear_backward(*args, 0.7, (False, True, False, False, False, False))
    assert calls == [(False, True)]


@needs_interpreter
@settings(max_examples=6, deadline=None, derandomize=True)
@given(spec=random_specs(lead=20, blocks=4, block_side=12, prototypes=4, rank=3), seed=st.integers(0, 2**16))
def test_random_cases_match_oracle(spec, seed):
    check_against_oracle("triton random", build_case(spec, seed), torch.float32, "triton")


@needs_interpreter
def test_auto_never_picks_the_interpreter():
    case = build_case(SPLoPASpec())
    x = case.values["x"].float()
    assert spa_kernels.backend.resolve(None, x.device, x.dtype, "splopa_linear").name != "triton"


# --------------------------------------------------------------------------- GPU code generation


def compile_every_kernel_for_gpu(capabilities: tuple[int, ...]) -> None:
    """Compile each kernel to a cubin for the given CUDA compute capabilities; no GPU needed.

    Runs in a process without ``TRITON_INTERPRET``.  Three variants per kernel:
    bf16 with every option on and the largest autotune config, fp16 with rank 1
    specialised to a constant (as a launch with r = 1 does), fp32 with the
    options off and the smallest config.
    """
    from spa_kernels.backend.triton import splopa, splopa_backward

    assert not splopa.INTERPRETED, "kernels were decorated for the interpreter"
    common = {"INPUT_PRECISION": "ieee", "IN_INTERPRETER": False}
    lists = {"blocks_ptr": "i32", "counts_ptr": "i32"}
    # (dtype, options on, config, sizes specialised to 1 in each kernel)
    variants = (("bf16", True, 0, (), ()), ("fp16", True, 1, ("RANK",), ("Q",)), ("fp32", False, -1, (), ()))
    for capability in capabilities:
        for dtype, on, pick, matmul_ones, gradient_ones in variants:
            compile_for_gpu(
                splopa.splopa_block_matmul_kernel, {"default": dtype, **lists},
                {**common, "HAS_BIAS": on, "BLOCK_KR": 64 if on else 16, "GROUP": 8},
                splopa._block_matmul_configs()[pick], capability,
                ones=matmul_ones, divisible_sizes=on,
            )
            compile_for_gpu(
                splopa_backward.splopa_block_gradient_kernel,
                {"default": dtype, **lists, "starts_ptr": "i64", "stack_ptr": "fp32"},
                {**common, "WRITE_STACK": on, "WRITE_WEIGHT": True},
                splopa_backward._block_gradient_configs()[pick], capability,
                ones=gradient_ones, divisible_sizes=on,
            )


@pytest.mark.skipif(not has_nvidia_compiler(), reason="this Triton has no NVIDIA code generator")
def test_kernels_compile_for_hopper_and_ampere():
    """What the interpreter cannot check: every kernel lowers through ptxas for sm_90 and sm_80."""
    done = run_without_interpreter(__file__, "compile_every_kernel_for_gpu((90, 80))")
    assert done.returncode == 0, done.stderr[-4000:]


# --------------------------------------------------------------------------- CUDA

BIG = {
    "32x32-half": SPLoPASpec(lead=(300,), block_shape=(32, 32), block_rows=12, block_cols=8, num_prototypes=8,
                             rank=2),
    "16x16-tenth-3d": SPLoPASpec(lead=(4, 65), block_shape=(16, 16), block_rows=20, block_cols=24, num_prototypes=16,
                                 rank=1, density=0.1),
    "64x64-mask-none-large-rank": SPLoPASpec(lead=(129,), block_shape=(64, 64), block_rows=3, block_cols=4,
                                             num_prototypes=12, rank=8, density=None),
    "4x4-blocks": SPLoPASpec(lead=(257,), block_shape=(4, 4), block_rows=40, block_cols=30, density=0.3),
    "odd-blocks-batch-1": SPLoPASpec(lead=(1,), block_shape=(17, 33), block_rows=5, block_cols=4),
    "all-pruned": SPLoPASpec(lead=(64,), block_shape=(32, 32), block_rows=2, block_cols=2, density=0.0),
}


@needs_cuda
@pytest.mark.parametrize("name", list(BIG))
def test_cuda_bfloat16_matches_oracle(name):
    check_against_oracle(f"triton cuda {name}", build_case(BIG[name]), torch.bfloat16, "triton", device="cuda")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", ["32x32-half", "4x4-blocks", "odd-blocks-batch-1"])
def test_cuda_other_dtypes_match_oracle(name, dtype):
    check_against_oracle(f"triton cuda {name}", build_case(BIG[name]), dtype, "triton", device="cuda")
