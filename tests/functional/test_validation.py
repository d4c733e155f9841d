"""Bad input to ``splora_linear`` fails early, with the right type and a message naming the argument.

docs/design.md section 5: every public entry point validates before any kernel runs
and raises ValueError/TypeError/IndexError naming the argument.  Each case
starts from a valid call and breaks exactly one thing; the test also checks
that no backend was reached.
"""

from __future__ import annotations

import fractions
import math

import numpy as np
import pytest
import torch
from support.linear_cases import recording_backend_calls

import spa_kernels
from spa_kernels import backend as backend_policy
from spa_kernels.backend import cpu as cpu_backend

M, IN, OUT, RANK = 4, 6, 5, 2


def valid_arguments() -> dict:
    return {
        "x": torch.randn(M, IN),
        "weight": torch.randn(OUT, IN),
        "lora_a": torch.randn(RANK, IN),
        "lora_b": torch.randn(OUT, RANK),
        "bias": torch.randn(OUT),
        "in_idx": torch.tensor([0, 2, 5]),
        "out_idx": torch.tensor([1, 4]),
        "scale": 0.5,
    }


def call(arguments: dict, backend: str | None = None):
    a = arguments
    return spa_kernels.splora_linear(
        a["x"], a["weight"], a["lora_a"], a["lora_b"], a["bias"], a["in_idx"], a["out_idx"],
        scale=a["scale"], backend=backend,
    )


META = torch.device("meta")

BAD_INPUTS = {
    # not a tensor / wrong rank
    "x-not-tensor": ({"x": [[0.0] * IN] * M}, TypeError, r"\bx\b"),
    "x-0d": ({"x": torch.tensor(1.0)}, ValueError, r"\bx\b"),
    "weight-not-tensor": ({"weight": np.zeros((OUT, IN), np.float32)}, TypeError, "weight"),
    "weight-1d": ({"weight": torch.randn(IN)}, ValueError, "weight"),
    "weight-3d": ({"weight": torch.randn(1, OUT, IN)}, ValueError, "weight"),
    "lora_a-not-tensor": ({"lora_a": 1.0}, TypeError, "lora_a"),
    "lora_a-1d": ({"lora_a": torch.randn(IN)}, ValueError, "lora_a"),
    "lora_a-3d-module-layout": ({"lora_a": torch.randn(1, RANK, IN)}, ValueError, "lora_a"),
    "lora_b-3d-module-layout": ({"lora_b": torch.randn(1, OUT, RANK)}, ValueError, "lora_b"),
    "bias-2d": ({"bias": torch.randn(OUT, 1)}, ValueError, "bias"),
    "bias-not-tensor": ({"bias": [0.0] * OUT}, TypeError, "bias"),
    # shape mismatch
    "x-features": ({"x": torch.randn(M, IN + 1)}, ValueError, r"\bx\b.*features"),
    "lora_a-in": ({"lora_a": torch.randn(RANK, IN - 1)}, ValueError, "lora_a"),
    "lora_b-rank": ({"lora_b": torch.randn(OUT, RANK + 1)}, ValueError, "lora_b"),
    "lora_b-out": ({"lora_b": torch.randn(OUT - 1, RANK)}, ValueError, "lora_b"),
    "lora_b-transposed": ({"lora_b": torch.randn(RANK, OUT)}, ValueError, "lora_b"),
    "bias-length": ({"bias": torch.randn(OUT + 1)}, ValueError, "bias"),
    "lora_a-without-lora_b": ({"lora_b": None}, ValueError, "lora_b"),
    "lora_b-without-lora_a": ({"lora_a": None}, ValueError, "lora_a"),
    "rank-0-adapter": ({"lora_a": torch.randn(0, IN), "lora_b": torch.randn(OUT, 0)}, ValueError, "lora_a"),
    # dtypes
    "x-int": ({"x": torch.ones(M, IN, dtype=torch.int32)}, TypeError, r"\bx\b"),
    "x-complex": ({"x": torch.randn(M, IN, dtype=torch.complex64)}, TypeError, r"\bx\b"),
    "weight-int": ({"weight": torch.ones(OUT, IN, dtype=torch.int64)}, TypeError, "weight"),
    "weight-float64": ({"weight": torch.randn(OUT, IN, dtype=torch.float64)}, TypeError, "weight"),
    "lora_a-float64": ({"lora_a": torch.randn(RANK, IN, dtype=torch.float64)}, TypeError, "lora_a"),
    "lora_b-float16": ({"lora_b": torch.randn(OUT, RANK).half()}, TypeError, "lora_b"),
    "bias-bfloat16": ({"bias": torch.randn(OUT).bfloat16()}, TypeError, "bias"),
    # devices
    "weight-other-device": ({"weight": torch.empty(OUT, IN, device=META)}, ValueError, "weight"),
    "lora_a-other-device": ({"lora_a": torch.empty(RANK, IN, device=META)}, ValueError, "lora_a"),
    "lora_b-other-device": ({"lora_b": torch.empty(OUT, RANK, device=META)}, ValueError, "lora_b"),
    "bias-other-device": ({"bias": torch.empty(OUT, device=META)}, ValueError, "bias"),
    "in_idx-other-device": ({"in_idx": torch.tensor([0, 1], device=META)}, ValueError, "in_idx"),
    # index lists
    "in_idx-negative": ({"in_idx": torch.tensor([-1, 2])}, IndexError, "in_idx"),
    "in_idx-equal-size": ({"in_idx": torch.tensor([0, IN])}, IndexError, "in_idx"),
    "in_idx-far-out-int32": ({"in_idx": torch.tensor([3, 2**31 - 1], dtype=torch.int32)}, IndexError, "in_idx"),
    "out_idx-equal-size": ({"out_idx": torch.tensor([OUT])}, IndexError, "out_idx"),
    "out_idx-negative": ({"out_idx": torch.tensor([-OUT, 1])}, IndexError, "out_idx"),
    "in_idx-unsorted": ({"in_idx": torch.tensor([2, 0, 5])}, ValueError, "in_idx"),
    "out_idx-duplicate": ({"out_idx": torch.tensor([1, 1, 4])}, ValueError, "out_idx"),
    "in_idx-duplicate-int32": ({"in_idx": torch.tensor([3, 3], dtype=torch.int32)}, ValueError, "in_idx"),
    "in_idx-float": ({"in_idx": torch.tensor([0.0, 2.0])}, TypeError, "in_idx"),
    "out_idx-bool-mask": ({"out_idx": torch.tensor([True, False, True, False, True])}, TypeError, "out_idx"),
    "in_idx-int16": ({"in_idx": torch.tensor([0, 2], dtype=torch.int16)}, TypeError, "in_idx"),
    "in_idx-uint8": ({"in_idx": torch.tensor([0, 2], dtype=torch.uint8)}, TypeError, "in_idx"),
    "in_idx-2d": ({"in_idx": torch.tensor([[0, 2]])}, ValueError, "in_idx"),
    "out_idx-0d": ({"out_idx": torch.tensor(1)}, ValueError, "out_idx"),
    "in_idx-list": ({"in_idx": [0, 2, 5]}, TypeError, "in_idx"),
    # scale
    "scale-nan": ({"scale": float("nan")}, ValueError, "scale"),
    "scale-inf": ({"scale": math.inf}, ValueError, "scale"),
    "scale-minus-inf": ({"scale": -math.inf}, ValueError, "scale"),
    "scale-numpy-nan": ({"scale": np.float32("nan")}, ValueError, "scale"),
    "scale-str": ({"scale": "1.0"}, TypeError, "scale"),
    "scale-none": ({"scale": None}, TypeError, "scale"),
    "scale-bool": ({"scale": True}, TypeError, "scale"),
    "scale-complex": ({"scale": 1 + 1j}, TypeError, "scale"),
    "scale-tensor": ({"scale": torch.tensor(0.5)}, TypeError, "scale"),
}


@pytest.mark.parametrize("case_name", list(BAD_INPUTS))
def test_bad_input_raises_naming_the_argument(case_name):
    change, error, pattern = BAD_INPUTS[case_name]
    arguments = {**valid_arguments(), **change}
    with recording_backend_calls() as calls, pytest.raises(error, match=pattern) as raised:
        call(arguments)
    print(f"{case_name}: {raised.type.__name__}: {raised.value}")
    assert calls == [], f"a backend ran before the bad input was rejected: {calls}"


@pytest.mark.parametrize(
    ("backend", "error"),
    [("gpu", ValueError), ("", ValueError), ("nvidia", ValueError), (3, TypeError), (["cpu"], TypeError)],
)
def test_unknown_backend_name_raises(backend, error):
    with recording_backend_calls() as calls, pytest.raises(error, match="backend"):
        call(valid_arguments(), backend=backend)
    assert calls == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_backend_cuda_on_cpu_tensors_raises():
    with recording_backend_calls() as calls, pytest.raises(ValueError, match="backend='cuda'"):
        call(valid_arguments(), backend="cuda")
    assert calls == []


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_backend_without_dtype_support_raises(backend, monkeypatch):
    """An explicitly named backend whose capabilities exclude the dtype raises; it never falls back.

    The name is registered here with float32-only capabilities (and the reference's
    kernels), so the rule is tested whatever is built on this machine.
    """
    float32_only = backend_policy.Capabilities(devices=None, dtypes=(torch.float32,))
    kernels = backend_policy.get("reference").kernels
    monkeypatch.setitem(backend_policy._REGISTRY, backend, backend_policy.Backend(backend, float32_only, kernels))
    call(valid_arguments(), backend=backend)  # float32 runs
    arguments = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                 for k, v in valid_arguments().items()}
    with recording_backend_calls() as calls, pytest.raises(ValueError, match=f"backend='{backend}' cannot run"):
        call(arguments, backend=backend)
    assert calls == []


@pytest.mark.parametrize("value", ["garbage", "cuda-ish", "ref"])
def test_environment_variable_garbage_raises(monkeypatch, value):
    monkeypatch.setenv("SPA_KERNELS_BACKEND", value)
    with recording_backend_calls() as calls, pytest.raises(ValueError, match="SPA_KERNELS_BACKEND"):
        call(valid_arguments())
    assert calls == []


def test_use_backend_garbage_raises_on_entry():
    with pytest.raises(ValueError, match="backend"), spa_kernels.use_backend("garbage"):
        pass
    with pytest.raises(TypeError, match="backend"), spa_kernels.use_backend(None):
        pass


# --------------------------------------------------------------------------- accepted input


def _reference_result(arguments: dict) -> torch.Tensor:
    return call(arguments, backend="reference")


@pytest.mark.parametrize(
    "change",
    [
        {"scale": 2},
        {"scale": np.float32(0.5)},
        {"scale": np.float64(0.5)},
        {"scale": fractions.Fraction(1, 2)},
        {"in_idx": torch.tensor([0, 2, 5], dtype=torch.int32)},
        {"in_idx": torch.tensor([0, 9, 2, 9, 5])[::2]},  # non-contiguous index view
        {"out_idx": torch.tensor([1, 4], dtype=torch.int32)},
    ],
    ids=["scale-int", "scale-np32", "scale-np64", "scale-fraction", "in_idx-int32", "in_idx-strided", "out_idx-int32"],
)
def test_equivalent_spellings_are_accepted(change):
    """Integer, NumPy and Fraction scales and int32/strided index lists mean the same call."""
    base = valid_arguments()
    expected = _reference_result(base | {"scale": float(change.get("scale", base["scale"]))})
    got = _reference_result(base | change)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_empty_index_lists_are_valid():
    arguments = valid_arguments() | {"in_idx": torch.tensor([], dtype=torch.int64),
                                     "out_idx": torch.tensor([], dtype=torch.int32)}
    y = _reference_result(arguments)
    assert y.shape == (M, OUT) and bool((y == 0).all())


def test_index_tensors_are_not_modified():
    arguments = valid_arguments() | {"in_idx": torch.tensor([0, 2, 5], dtype=torch.int32)}
    before = arguments["in_idx"].clone(), arguments["out_idx"].clone()
    _reference_result(arguments)
    assert arguments["in_idx"].dtype == torch.int32
    assert torch.equal(arguments["in_idx"], before[0]) and torch.equal(arguments["out_idx"], before[1])


INDEX_LISTS = ([5], [0, 3, 9], [3, 3], [9, 2, 5], [-4, 1], [2, 1], [0, 1, 2, 7, 6])


@pytest.mark.parametrize("values", INDEX_LISTS, ids=str)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_index_range_and_order_agree_on_every_path(values, dtype):
    """The compiled reader, the NumPy fallback and the one-transfer torch path (GPUs) agree."""
    from spa_kernels import _extension, _validation

    idx = torch.tensor(values, dtype=dtype)
    expected = (min(values), max(values), all(b > a for a, b in zip(values, values[1:], strict=False)))
    assert _validation._range_and_order_with_numpy(idx) == expected
    assert _validation._range_and_order_on_device(idx) == expected
    assert _validation._range_and_order_on_host(idx) == expected
    if cpu_backend.BUILT:  # the host path then reads through the extension
        assert _extension.index_bounds is not None
        strided = torch.tensor([v for v in values for _ in range(2)], dtype=dtype)[::2]
        assert _extension.index_bounds(strided) == expected


@pytest.mark.skipif(not cpu_backend.BUILT, reason="the compiled extension is not built")
@pytest.mark.parametrize(
    "idx, error",
    [
        (torch.tensor([], dtype=torch.int64), ValueError),
        (torch.zeros(2, 2, dtype=torch.int64), ValueError),
        (torch.tensor([1.0, 2.0]), TypeError),
    ],
    ids=["empty", "2-D", "float"],
)
def test_compiled_index_reader_refuses_what_it_cannot_read(idx, error):
    from spa_kernels._extension import index_bounds

    with pytest.raises(error, match="index_bounds"):
        index_bounds(idx)
