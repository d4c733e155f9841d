"""Every non-reference backend of ``splopa_linear`` against the float64 oracle and the reference.

Forward and every gradient, on shapes that break kernels: blocks that are not
multiples of any tile, 1 × 1 blocks, primes, batch 1, rank 1 and large ranks,
densities 1.0 / 0.5 / 0.1, all pruned, one block kept, non-contiguous inputs,
every instruction set of the cpu backend.  NaN sits in every pruned block.

The triton backend runs on the CPU only in Triton's interpreter, hundreds of
times slower, so it gets its own list of small cases (``INTERPRETER_SPECS``)
rather than every case above; ``test_triton_splopa.py`` holds its other checks.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from support.linear_cases import check_results, forced_isa, skip_unless_available
from support.splopa_cases import (
    SPLoPASpec,
    build_case,
    check_against_oracle,
    non_reference_splopa_params,
    random_specs,
    run,
)

from spa_kernels.backend import triton as triton_backend

BACKENDS = non_reference_splopa_params(exclude=("triton",))  # triton: the interpreter cases at the end

SPECS = {
    "default": SPLoPASpec(),
    "mask-none": SPLoPASpec(density=None),
    "dense-given": SPLoPASpec(density=1.0, block_rows=4, block_cols=5),
    "tenth": SPLoPASpec(block_rows=6, block_cols=5, density=0.1),
    "all-pruned": SPLoPASpec(density=0.0),
    "one-block": SPLoPASpec(block_rows=3, block_cols=3, density=1 / 9),
    "batch-1": SPLoPASpec(lead=(1,)),
    "nd-noncontiguous-no-bias": SPLoPASpec(lead=(2, 3), noncontiguous=True, bias=False),
    "1x1-blocks": SPLoPASpec(block_shape=(1, 1), block_rows=9, block_cols=7, rank=1),
    "prime-blocks-large-rank": SPLoPASpec(block_shape=(13, 7), block_rows=2, block_cols=3, rank=7),
    "tile-sized-blocks": SPLoPASpec(lead=(300,), block_shape=(32, 32), block_rows=3, block_cols=4, num_prototypes=5,
                                    rank=1),
    "tall-batch-odd-blocks": SPLoPASpec(lead=(157,), block_shape=(17, 33), block_rows=3, block_cols=2),
    # Wider than a packed block of x (or dy) kept whole: products accumulate over depth chunks.
    "wide-chunked": SPLoPASpec(lead=(150,), block_shape=(16, 8), block_rows=60, block_cols=120, num_prototypes=2,
                               rank=1, density=0.3),
    "frozen-weight": SPLoPASpec(grads=("x", "prototype_rows", "prototype_cols", "pos_weights", "bias")),
    "adapter-only": SPLoPASpec(grads=("prototype_cols", "pos_weights")),
    "x-only": SPLoPASpec(grads=("x",)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("backend_param", BACKENDS)
def test_backend_matches_oracle_and_reference(backend_param, spec_name, dtype):
    backend, isa = backend_param
    skip_unless_available(backend, dtype)
    case = build_case(SPECS[spec_name])
    with forced_isa(isa):
        check_against_oracle(f"{backend}[{isa}] {spec_name}", case, dtype, backend)
        if dtype in (torch.float32, torch.float64):
            actual = run(case, dtype, backend)
            reference = run(case, dtype, "reference")
            check_results(f"{backend}[{isa}] {spec_name} vs reference", {k: v.double() for k, v in actual.items()},
                          {k: v.double() for k, v in reference.items()}, dtype)


@pytest.mark.parametrize("backend_param", BACKENDS)
@settings(max_examples=20, deadline=None)
@given(spec=random_specs(lead=40, blocks=5, block_side=20, prototypes=5, rank=4))
def test_backend_random_cases(backend_param, spec):
    backend, isa = backend_param
    # float64: a random case may cancel a gradient to a small fraction of its terms
    # (dV = Uᵀ dΠ), which float32 cannot resolve to 1e-4 of the result; the fixed
    # cases above cover float32 and bfloat16.
    with forced_isa(isa):
        check_against_oracle(f"{backend}[{isa}] random", build_case(spec), torch.float64, backend)


# --------------------------------------------------------------------------- triton, in the interpreter

needs_interpreter = pytest.mark.skipif(
    not triton_backend.is_available("cpu", None),
    reason="the triton backend runs on CPU tensors only with Triton installed and TRITON_INTERPRET=1 set before "
           "its import",
)

# Small enough for the interpreter, whose tiles are 16 wide: 4 × 4 and 8 × 8
# blocks pack several blocks per tile; 17 × 33 blocks span tiles with ragged
# tails; K·r = 21 takes two blocks of prototype ranks.
INTERPRETER_SPECS = {
    "default": SPLoPASpec(),
    "4x4-k1-rank1": SPLoPASpec(lead=(20,), block_shape=(4, 4), block_rows=5, block_cols=6, num_prototypes=1,
                               rank=1),
    "8x8-mask-none": SPLoPASpec(lead=(18,), block_shape=(8, 8), block_rows=3, block_cols=4, density=None),
    "8x8-dense-given": SPLoPASpec(lead=(5,), block_shape=(8, 8), block_rows=2, block_cols=3, density=1.0),
    "4x4-tenth": SPLoPASpec(lead=(9,), block_shape=(4, 4), block_rows=6, block_cols=5, density=0.1),
    "all-pruned": SPLoPASpec(block_shape=(4, 4), density=0.0),
    "one-block": SPLoPASpec(block_shape=(8, 8), block_rows=3, block_cols=3, density=1 / 9),
    "batch-1": SPLoPASpec(lead=(1,), block_shape=(4, 4)),
    "3d-noncontiguous-no-bias": SPLoPASpec(lead=(2, 3), block_shape=(4, 4), noncontiguous=True, bias=False),
    "1x1-blocks": SPLoPASpec(block_shape=(1, 1), block_rows=9, block_cols=7, rank=1),
    "prime-blocks-k3-rank7": SPLoPASpec(block_shape=(13, 7), block_rows=2, block_cols=3, rank=7),
    "blocks-wider-than-tiles": SPLoPASpec(lead=(21,), block_shape=(17, 33), block_rows=3, block_cols=2, rank=2),
    "frozen-weight": SPLoPASpec(block_shape=(4, 4), grads=("x", "prototype_rows", "prototype_cols", "pos_weights",
                                                           "bias")),
    "adapter-only": SPLoPASpec(block_shape=(8, 8), grads=("prototype_cols", "pos_weights")),
    "x-only": SPLoPASpec(block_shape=(4, 4), grads=("x",)),
}

INTERPRETER_LOW_PRECISION = ("default", "8x8-mask-none", "blocks-wider-than-tiles")


@needs_interpreter
@pytest.mark.parametrize("spec_name", list(INTERPRETER_SPECS))
def test_triton_float32_matches_oracle_and_reference(spec_name):
    case = build_case(INTERPRETER_SPECS[spec_name])
    check_against_oracle(f"triton {spec_name}", case, torch.float32, "triton")
    check_results(f"triton {spec_name} vs reference",
                  {k: v.double() for k, v in run(case, torch.float32, "triton").items()},
                  {k: v.double() for k, v in run(case, torch.float32, "reference").items()}, torch.float32)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("spec_name", INTERPRETER_LOW_PRECISION)
def test_triton_low_precision_within_twice_torch_error(spec_name, dtype):
    check_against_oracle(f"triton {spec_name}", build_case(INTERPRETER_SPECS[spec_name]), dtype, "triton")
