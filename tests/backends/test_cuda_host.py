"""The cuda backend's host-side code against the reference backend, on the CPU.

The CUDA kernels run a list of gathered GEMM problems per op; which problems,
over which index maps and tile plan, is decided by header-only C++
(``csrc/cuda/gemm_problem.h``, ``op_problems*.h``) with no CUDA dependency.
``tests/cuda_host/emulator.cpp`` compiles those very headers with the host
compiler and runs each problem on the CPU tile by tile as the kernel walks it:
active tiles, then zero tiles over the pruned outputs.  It checks every read
against the bounds of its tensor and counts the writes to every output element.

So these tests check, without a GPU: the tile plan and launch geometry, the
index maps of linear and convolution operands (padding, stride, dilation, the
input gradient's strided taps, the centre tap), the split rank-r intermediate,
the zeroing of pruned outputs in the same launch (every element written exactly
once), and the argument checks the binding runs before a launch.  What they do
not check is device code (shared-memory staging, mma fragments): that is
tests/backends/test_cuda_backend.py on a GPU.
"""

from __future__ import annotations

import functools
import pathlib

import pytest
import torch

from spa_kernels.backend.reference import conv as reference_conv
from spa_kernels.backend.reference import linear as reference_linear

ROOT = pathlib.Path(__file__).resolve().parents[2]
TILES = {"kernel-large": [128, 128, 16], "kernel-small": [64, 64, 32], "tiny": [16, 8, 16], "ragged": [5, 3, 7]}


@functools.cache
def emulator():
    from torch.utils import cpp_extension

    try:
        return cpp_extension.load(
            name="spa_cuda_host_emulator",
            sources=[str(ROOT / "tests" / "cuda_host" / "emulator.cpp")],
            extra_include_paths=[str(ROOT / "csrc" / "cuda")],
            extra_cflags=["-O1", "-std=c++20"],
            verbose=False,
        )
    except (RuntimeError, OSError) as error:  # no host compiler: nothing here can run
        pytest.skip(f"cannot compile the host emulator: {error}")


def _indices(keep, size: int, gen: torch.Generator):
    if keep is None:
        return None
    count = keep if isinstance(keep, int) else min(size, max(1, round(keep * size))) if keep > 0 else 0
    return torch.randperm(size, generator=gen)[:count].sort().values


def _int32(idx):
    return None if idx is None else idx.to(torch.int32)


def _assert_written_once(counts: list[torch.Tensor], label: str) -> None:
    for i, c in enumerate(counts):
        assert c.numel() == 0 or (int(c.min()) == 1 and int(c.max()) == 1), (
            f"{label}: output {i} has elements written {int(c.min())}..{int(c.max())} times (each must be written once)"
        )


def _assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    assert not torch.isnan(actual).any(), f"{name}: an element was never written"
    error = float((actual.double() - expected.double()).abs().max())
    tolerance = 1e-4 * max(1.0, float(expected.abs().max()))
    print(f"{name}: max |error| {error:.3e}, tolerance {tolerance:.3e}")
    assert error <= tolerance, f"{name}: max |error| {error:.3e} exceeds {tolerance:.3e}"


# --------------------------------------------------------------------------- linear

LINEAR_CASES = {
    "basic": dict(rows=7, inp=13, out=31, rank=4, keep_in=0.5, keep_out=0.5),
    "all-active-no-index": dict(rows=9, inp=17, out=11, rank=3, keep_in=None, keep_out=None),
    "every-index-listed": dict(rows=9, inp=17, out=11, rank=3, keep_in=1.0, keep_out=1.0),
    "all-pruned-in": dict(rows=5, inp=12, out=9, rank=2, keep_in=0, keep_out=0.5),
    "all-pruned-out": dict(rows=5, inp=12, out=9, rank=2, keep_in=0.5, keep_out=0),
    "one-channel": dict(rows=3, inp=10, out=10, rank=1, keep_in=1, keep_out=1),
    "rank-above-in": dict(rows=6, inp=5, out=7, rank=9, keep_in=0.6, keep_out=0.4),
    "plain-masked": dict(rows=11, inp=23, out=19, rank=None, keep_in=0.3, keep_out=0.7),
    "one-row-primes": dict(rows=1, inp=29, out=37, rank=5, keep_in=0.1, keep_out=0.9),
    "multi-tile": dict(rows=131, inp=70, out=150, rank=16, keep_in=0.5, keep_out=0.5),
}


def _linear_inputs(spec: dict, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rows, inp, out, rank = spec["rows"], spec["inp"], spec["out"], spec["rank"]
    t = {
        "x": torch.randn(rows, inp, generator=gen),
        "weight": torch.randn(out, inp, generator=gen),
        "lora_a": torch.randn(rank, inp, generator=gen) if rank else None,
        "lora_b": torch.randn(out, rank, generator=gen) if rank else None,
        "bias": torch.randn(out, generator=gen),
        "grad_out": torch.randn(rows, out, generator=gen),
    }
    in_idx, out_idx = _indices(spec["keep_in"], inp, gen), _indices(spec["keep_out"], out, gen)
    return t, in_idx, out_idx


@pytest.mark.parametrize("split", [False, True], ids=["fp32-intermediate", "split-intermediate"])
@pytest.mark.parametrize("tile", list(TILES), ids=list(TILES))
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_problems_match_reference(case: str, tile: str, split: bool) -> None:
    t, in_idx, out_idx = _linear_inputs(LINEAR_CASES[case])
    scale = 0.75
    em = emulator()
    forward = em.linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], t["bias"], _int32(in_idx), _int32(out_idx),
                        scale, split, TILES[tile], None, [])
    y, counts = forward[0], forward[1:]
    expected = reference_linear.splora_linear_forward(
        t["x"], t["weight"], t["lora_a"], t["lora_b"], t["bias"], in_idx, out_idx, scale
    )
    _assert_close("y", y, expected)
    _assert_written_once(counts[2:], f"{case} forward")  # y (the intermediates may be partly unused)

    mask = [True, True, t["lora_a"] is not None, t["lora_a"] is not None, True]
    backward = em.linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], None, _int32(in_idx), _int32(out_idx),
                         scale, split, TILES[tile], t["grad_out"], mask)
    grads, counts = backward[:5], backward[5:]
    expected = reference_linear.splora_linear_backward(
        t["grad_out"], t["x"], t["weight"], t["lora_a"], t["lora_b"], in_idx, out_idx, scale, tuple(mask)
    )
    for name, got, want in zip(("x", "weight", "lora_a", "lora_b", "bias"), grads, expected, strict=True):
        if want is not None:
            _assert_close(f"grad {name}", got, want)
    _assert_written_once(counts[2:], f"{case} backward")


# --------------------------------------------------------------------------- conv

CONV_CASES = {
    "3x3-pad1": dict(d=2, batch=2, cin=6, cout=5, spatial=(7, 6), kernel=(3, 3), stride=(1, 1), padding=(1, 1),
                     dilation=(1, 1), rank=3, keep_in=0.5, keep_out=0.6),
    "stride2-dilation2": dict(d=2, batch=1, cin=5, cout=7, spatial=(9, 8), kernel=(3, 3), stride=(2, 2),
                              padding=(2, 1), dilation=(2, 2), rank=2, keep_in=0.6, keep_out=0.5),
    "5x3-stride3-nopad": dict(d=2, batch=2, cin=4, cout=3, spatial=(11, 7), kernel=(5, 3), stride=(3, 2),
                              padding=(0, 0), dilation=(1, 1), rank=2, keep_in=None, keep_out=0.5),
    "1x1": dict(d=2, batch=3, cin=8, cout=6, spatial=(4, 5), kernel=(1, 1), stride=(1, 1), padding=(0, 0),
                dilation=(1, 1), rank=4, keep_in=0.4, keep_out=None),
    "all-pruned-out": dict(d=2, batch=1, cin=4, cout=5, spatial=(5, 5), kernel=(3, 3), stride=(1, 1),
                           padding=(1, 1), dilation=(1, 1), rank=2, keep_in=0.5, keep_out=0),
    "all-pruned-in": dict(d=2, batch=1, cin=4, cout=5, spatial=(5, 5), kernel=(3, 3), stride=(1, 1),
                          padding=(1, 1), dilation=(1, 1), rank=2, keep_in=0, keep_out=0.5),
    "plain-masked": dict(d=2, batch=2, cin=5, cout=4, spatial=(6, 6), kernel=(3, 3), stride=(2, 1),
                         padding=(1, 1), dilation=(1, 1), rank=None, keep_in=0.6, keep_out=0.5),
    "sppara": dict(d=2, batch=2, cin=5, cout=6, spatial=(6, 5), kernel=(3, 3), stride=(2, 2), padding=(1, 1),
                   dilation=(1, 1), rank="sppara", keep_in=0.6, keep_out=0.5),
    "conv1d": dict(d=1, batch=2, cin=6, cout=5, spatial=(13,), kernel=(5,), stride=(2,), padding=(2,),
                   dilation=(1,), rank=3, keep_in=0.5, keep_out=0.5),
    "conv3d": dict(d=3, batch=1, cin=3, cout=4, spatial=(4, 5, 3), kernel=(3, 3, 1), stride=(1, 2, 1),
                   padding=(1, 1, 0), dilation=(1, 1, 1), rank=2, keep_in=2, keep_out=3),
}


def _conv_inputs(spec: dict, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    cin, cout, rank = spec["cin"], spec["cout"], spec["rank"]
    sppara = rank == "sppara"
    x = torch.randn(spec["batch"], cin, *spec["spatial"], generator=gen)
    weight = torch.randn(cout, cin, *spec["kernel"], generator=gen)
    t = {
        "x": x,
        "weight": weight,
        "lora_a": torch.randn(rank, cin, generator=gen) if rank and not sppara else None,
        "lora_b": torch.randn(cout, rank, generator=gen) if rank and not sppara else None,
        "adapter": torch.randn(cout, cin, generator=gen) if sppara else None,
        "bias": torch.randn(cout, generator=gen),
    }
    in_idx, out_idx = _indices(spec["keep_in"], cin, gen), _indices(spec["keep_out"], cout, gen)
    return t, in_idx, out_idx, gen


@pytest.mark.parametrize("split", [False, True], ids=["fp32-intermediate", "split-intermediate"])
@pytest.mark.parametrize("tile", ["kernel-small", "tiny", "ragged"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_problems_match_reference(case: str, tile: str, split: bool) -> None:
    spec = CONV_CASES[case]
    t, in_idx, out_idx, gen = _conv_inputs(spec)
    geometry = (tuple(spec["stride"]), tuple(spec["padding"]), tuple(spec["dilation"]))
    scale = 0.5
    em = emulator()
    sppara = t["adapter"] is not None
    if sppara:
        expected_y = reference_conv.sppara_conv_forward(t["x"], t["weight"], t["adapter"], t["bias"], in_idx, out_idx,
                                                        *geometry, 1)
    else:
        expected_y = reference_conv.splora_conv_forward(t["x"], t["weight"], t["lora_a"], t["lora_b"], t["bias"],
                                                        in_idx, out_idx, *geometry, 1, scale)
    forward = em.conv(t["x"], t["weight"], t["lora_a"], t["lora_b"], t["adapter"], t["bias"], _int32(in_idx),
                      _int32(out_idx), scale, split, *[list(g) for g in geometry], TILES[tile], None, [])
    _assert_close("y", forward[0], expected_y)
    _assert_written_once(forward[1:][2:], f"{case} forward")

    grad_out = torch.randn(expected_y.shape, generator=gen)
    lora = t["lora_a"] is not None
    mask = [True, True, lora, lora, sppara, True]
    backward = em.conv(t["x"], t["weight"], t["lora_a"], t["lora_b"], t["adapter"], None, _int32(in_idx),
                       _int32(out_idx), scale, split, *[list(g) for g in geometry], TILES[tile], grad_out, mask)
    grads, counts = backward[:6], backward[6:]
    if sppara:
        gx, gw, gp, gb = reference_conv.sppara_conv_backward(grad_out, t["x"], t["weight"], t["adapter"], in_idx,
                                                             out_idx, *geometry, 1, (True, True, True, True))
        expected = {"x": gx, "weight": gw, "adapter": gp, "bias": gb}
    else:
        gx, gw, ga, gb_, gb = reference_conv.splora_conv_backward(grad_out, t["x"], t["weight"], t["lora_a"],
                                                                  t["lora_b"], in_idx, out_idx, *geometry, 1, scale,
                                                                  (True, True, lora, lora, True))
        expected = {"x": gx, "weight": gw, "lora_a": ga, "lora_b": gb_, "bias": gb}
    names = ("x", "weight", "lora_a", "lora_b", "adapter", "bias")
    for name, got in zip(names, grads, strict=True):
        if expected.get(name) is not None:
            _assert_close(f"grad {name}", got, expected[name])
    _assert_written_once(counts[2:], f"{case} backward")


# --------------------------------------------------------------------------- plan, maps, checks


@pytest.mark.parametrize(
    ("rows", "inp", "out", "active_out", "tile"),
    [(1576, 768, 3072, 1536, [128, 128, 16]), (1, 5, 7, 7, [64, 64, 32]), (130, 9, 300, 0, [128, 128, 16]),
     (64, 9, 129, 128, [64, 64, 32]), (3, 4, 5, 5, [128, 128, 16])],
)
def test_launch_geometry(rows: int, inp: int, out: int, active_out: int, tile: list[int]) -> None:
    plan = emulator().linear_forward_plan(rows, inp, out, active_out, tile)
    row_tiles, col_tiles, active, zero_rows, zero_cols, zero, total, grid = plan
    ceil = lambda a, b: -(-a // b)  # noqa: E731
    assert (row_tiles, col_tiles, active) == (ceil(rows, tile[0]), ceil(active_out, tile[1]),
                                              ceil(rows, tile[0]) * ceil(active_out, tile[1]))
    if active_out < out:  # zero tiles cover the full output
        assert (zero_rows, zero_cols, zero) == (ceil(rows, tile[0]), ceil(out, tile[1]),
                                                ceil(rows, tile[0]) * ceil(out, tile[1]))
    else:  # nothing pruned: only active tiles are launched
        assert zero == 0
    assert total == active + zero and grid == total


def test_axis_point_decodes_outer_and_inner_box() -> None:
    em = emulator()
    index = torch.tensor([1, 4, 6], dtype=torch.int32)
    # outer through the index list, inner box (2, 3, 5) folded with strides (100, 10, 1), coordinates kept
    inner, strides, scale, shift = [2, 3, 5], [100, 10, 1], [2, 3, 4], [-1, 0, 7]
    for i in range(3 * 30):
        offset, cd, ch, cw = em.axis_point(7, inner, 1000, strides, scale, shift, index, i)
        outer, rest = divmod(i, 30)
        d, rest = divmod(rest, 15)
        h, w = divmod(rest, 5)
        assert offset == int(index[outer]) * 1000 + d * 100 + h * 10 + w
        assert (cd, ch, cw) == (d * 2 - 1, h * 3, w * 4 + 7)
    offset, *_ = em.axis_point(7, inner, 1000, strides, scale, shift, index, 90)  # past the end
    assert offset < 0


def test_axis_point_is_64_bit() -> None:
    # An offset beyond 2^31 (a tensor of more than 2^31 elements) must not wrap.
    offset, *_ = emulator().axis_point(1 << 20, [1, 1, 1], 1 << 16, [0, 0, 0], [0, 0, 0], [0, 0, 0], None, 70000)
    assert offset == 70000 << 16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rows=-1), "rows"),
        (dict(active_in=14), "in_idx"),
        (dict(active_out=32), "out_idx"),
        (dict(has_in_idx=False, active_in=5), "without in_idx"),
        (dict(rank=0), "rank"),
        (dict(element_bytes=8), "element_bytes"),
        (dict(in_features=1 << 32, active_in=1), "32 bits"),
    ],
)
def test_linear_argument_checks(kwargs: dict, message: str) -> None:
    args = dict(rows=7, in_features=13, out_features=31, rank=4, active_in=6, active_out=15, has_in_idx=True,
                has_out_idx=True, has_lora=True, element_bytes=2)
    em = emulator()
    assert em.check_linear(*args.values()) == ""
    args.update(kwargs)
    assert message in em.check_linear(*args.values())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(kernel=[1, 2, 3]), "odd"),
        (dict(stride=[1, 0, 1]), "stride"),
        (dict(padding=[0, -1, 1]), "padding"),
        (dict(output=[1, 5, 9]), "output size"),
    ],
)
def test_conv_argument_checks(change: dict, message: str) -> None:
    geometry = dict(input=[1, 7, 9], kernel=[1, 3, 3], output=[1, 7, 9], stride=[1, 1, 1], padding=[0, 1, 1],
                    dilation=[1, 1, 1])
    em = emulator()
    assert em.check_conv(*geometry.values()) == ""
    geometry.update(change)
    assert message in em.check_conv(*geometry.values())


def test_cuda_backend_module_imports_without_its_build() -> None:
    from spa_kernels.backend import cuda as cuda_backend

    assert cuda_backend.name == "cuda"
    if not cuda_backend.BUILT:
        assert not cuda_backend.is_available("cuda", torch.bfloat16)
        with pytest.raises(RuntimeError, match="not built"):
            cuda_backend.splora_linear_forward(None, None, None, None, None, None, None, 1.0)
    assert not cuda_backend.is_available("cpu", torch.float32)
    assert not cuda_backend.is_available("cuda", torch.float64)


def test_auto_never_prefers_cuda_before_it_passed_on_hardware() -> None:
    from spa_kernels import backend as backend_registry
    from spa_kernels.backend import cuda as cuda_backend

    if not cuda_backend.PASSED_ON_HARDWARE:
        assert "cuda" not in backend_registry.AUTO_PREFERENCE["cuda"]
