"""Bad input to the convolutions fails early, with the right type and a message naming the argument.

docs/design.md section 5.  Each case starts from a valid ``splora_conv2d`` (or
``sppara_conv2d``) call and breaks exactly one thing; the test also checks that
no backend was reached.  Grouped convolutions on a fused backend are refused
the same way.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from support.linear_cases import recording_backend_calls

import spa_kernels
from spa_kernels import functional

N, C_IN, C_OUT, H, W, RANK = 2, 6, 4, 7, 7, 2
META = torch.device("meta")


def valid_splora() -> dict:
    return {
        "x": torch.randn(N, C_IN, H, W),
        "weight": torch.randn(C_OUT, C_IN, 3, 3),
        "lora_a": torch.randn(RANK, C_IN),
        "lora_b": torch.randn(C_OUT, RANK),
        "bias": torch.randn(C_OUT),
        "in_idx": torch.tensor([0, 2, 5]),
        "out_idx": torch.tensor([1, 3]),
        "stride": 1,
        "padding": 1,
        "dilation": 1,
        "groups": 1,
        "scale": 0.5,
    }


def valid_sppara() -> dict:
    arguments = valid_splora()
    del arguments["lora_a"], arguments["lora_b"], arguments["scale"]
    return arguments | {"adapter": torch.randn(C_OUT, C_IN)}


def call_splora(a: dict, backend: str | None = None, fn=None):
    fn = fn or spa_kernels.splora_conv2d
    return fn(a["x"], a["weight"], a["lora_a"], a["lora_b"], a["bias"], a["in_idx"], a["out_idx"],
              stride=a["stride"], padding=a["padding"], dilation=a["dilation"], groups=a["groups"],
              scale=a["scale"], backend=backend)


def call_sppara(a: dict, backend: str | None = None, fn=None):
    fn = fn or spa_kernels.sppara_conv2d
    return fn(a["x"], a["weight"], a["adapter"], a["bias"], a["in_idx"], a["out_idx"], stride=a["stride"],
              padding=a["padding"], dilation=a["dilation"], groups=a["groups"], backend=backend)


def _rejected(call, arguments: dict, error, pattern: str, backend: str | None = None) -> None:
    with recording_backend_calls() as calls, pytest.raises(error, match=pattern) as raised:
        call(arguments, backend)
    print(f"{raised.type.__name__}: {raised.value}")
    assert calls == [], f"a backend ran before the bad input was rejected: {calls}"


BAD_COMMON = {
    # not a tensor / wrong rank
    "x-not-tensor": ({"x": np.zeros((N, C_IN, H, W), np.float32)}, TypeError, r"\bx\b"),
    "x-3d": ({"x": torch.randn(C_IN, H, W)}, ValueError, r"\bx must be 4-D"),
    "x-5d": ({"x": torch.randn(N, C_IN, 1, H, W)}, ValueError, r"\bx must be 4-D"),
    "weight-not-tensor": ({"weight": [[0.0]]}, TypeError, "weight"),
    "weight-3d": ({"weight": torch.randn(C_OUT, C_IN, 3)}, ValueError, "weight must be 4-D"),
    "weight-5d": ({"weight": torch.randn(C_OUT, C_IN, 3, 3, 3)}, ValueError, "weight must be 4-D"),
    "bias-2d": ({"bias": torch.randn(C_OUT, 1)}, ValueError, "bias"),
    "bias-not-tensor": ({"bias": [0.0] * C_OUT}, TypeError, "bias"),
    # kernel
    "kernel-even": ({"weight": torch.randn(C_OUT, C_IN, 2, 2)}, ValueError, "kernel size"),
    "kernel-even-one-dim": ({"weight": torch.randn(C_OUT, C_IN, 3, 4)}, ValueError, r"kernel size \(3, 4\)"),
    "weight-no-output-channels": ({"weight": torch.randn(0, C_IN, 3, 3)}, ValueError, "weight"),
    # shape mismatch
    "x-channels": ({"x": torch.randn(N, C_IN + 1, H, W)}, ValueError, r"\bx has 7 channels"),
    "weight-in-channels": ({"weight": torch.randn(C_OUT, C_IN - 1, 3, 3)}, ValueError, "weight"),
    "bias-length": ({"bias": torch.randn(C_OUT + 1)}, ValueError, "bias"),
    "x-empty-spatial": ({"x": torch.randn(N, C_IN, 0, W)}, ValueError, r"\bx\b.*spatial"),
    "x-too-small": ({"x": torch.randn(N, C_IN, 2, 2), "padding": 0}, ValueError, r"\bx\b.*too small"),
    "x-too-small-dilation": ({"padding": 0, "dilation": 4}, ValueError, r"\bx\b.*too small"),
    # dtypes
    "x-int": ({"x": torch.ones(N, C_IN, H, W, dtype=torch.int32)}, TypeError, r"\bx\b"),
    "x-complex": ({"x": torch.randn(N, C_IN, H, W, dtype=torch.complex64)}, TypeError, r"\bx\b"),
    "weight-float64": ({"weight": torch.randn(C_OUT, C_IN, 3, 3, dtype=torch.float64)}, TypeError, "weight"),
    "bias-bfloat16": ({"bias": torch.randn(C_OUT).bfloat16()}, TypeError, "bias"),
    # devices
    "weight-other-device": ({"weight": torch.empty(C_OUT, C_IN, 3, 3, device=META)}, ValueError, "weight"),
    "bias-other-device": ({"bias": torch.empty(C_OUT, device=META)}, ValueError, "bias"),
    "in_idx-other-device": ({"in_idx": torch.tensor([0, 1], device=META)}, ValueError, "in_idx"),
    # index lists
    "in_idx-negative": ({"in_idx": torch.tensor([-1, 2])}, IndexError, "in_idx"),
    "in_idx-equal-size": ({"in_idx": torch.tensor([0, C_IN])}, IndexError, "in_idx"),
    "in_idx-far-out-int32": ({"in_idx": torch.tensor([3, 2**31 - 1], dtype=torch.int32)}, IndexError, "in_idx"),
    "out_idx-equal-size": ({"out_idx": torch.tensor([C_OUT])}, IndexError, "out_idx"),
    "in_idx-unsorted": ({"in_idx": torch.tensor([2, 0, 5])}, ValueError, "in_idx"),
    "out_idx-duplicate": ({"out_idx": torch.tensor([1, 1, 3])}, ValueError, "out_idx"),
    "in_idx-float": ({"in_idx": torch.tensor([0.0, 2.0])}, TypeError, "in_idx"),
    "out_idx-bool-mask": ({"out_idx": torch.tensor([True, False, True, False])}, TypeError, "out_idx"),
    "in_idx-int16": ({"in_idx": torch.tensor([0, 2], dtype=torch.int16)}, TypeError, "in_idx"),
    "in_idx-2d": ({"in_idx": torch.tensor([[0, 2]])}, ValueError, "in_idx"),
    "in_idx-list": ({"in_idx": [0, 2, 5]}, TypeError, "in_idx"),
    # stride, padding, dilation
    "stride-0": ({"stride": 0}, ValueError, "stride"),
    "stride-negative-tuple": ({"stride": (1, -2)}, ValueError, "stride"),
    "stride-wrong-length": ({"stride": (1, 1, 1)}, ValueError, "stride"),
    "stride-float": ({"stride": 1.5}, TypeError, "stride"),
    "stride-bool": ({"stride": True}, TypeError, "stride"),
    "stride-str": ({"stride": "1"}, TypeError, "stride"),
    "stride-tuple-of-float": ({"stride": (1, 2.0)}, TypeError, "stride"),
    "stride-none": ({"stride": None}, TypeError, "stride"),
    "dilation-0": ({"dilation": 0}, ValueError, "dilation"),
    "dilation-wrong-length": ({"dilation": (1,)}, ValueError, "dilation"),
    "padding-negative": ({"padding": -1}, ValueError, "padding"),
    "padding-negative-tuple": ({"padding": (1, -1)}, ValueError, "padding"),
    "padding-unknown-mode": ({"padding": "full"}, ValueError, "padding"),
    "padding-same-stride-2": ({"padding": "same", "stride": 2}, ValueError, "padding='same'.*stride"),
    "padding-same-stride-tuple": ({"padding": "same", "stride": (1, 2)}, ValueError, "padding='same'.*stride"),
    "padding-wrong-length": ({"padding": (1, 1, 1)}, ValueError, "padding"),
    "padding-float": ({"padding": 1.0}, TypeError, "padding"),
    "padding-none": ({"padding": None}, TypeError, "padding"),
    # groups
    "groups-0": ({"groups": 0}, ValueError, "groups"),
    "groups-not-dividing-in": ({"groups": 4}, ValueError, "groups"),
    "groups-not-dividing-out": ({"groups": 3}, ValueError, "groups"),
    "groups-weight-mismatch": ({"groups": 2}, ValueError, "groups=2"),
    "groups-float": ({"groups": 1.0}, TypeError, "groups"),
    "groups-bool": ({"groups": True}, TypeError, "groups"),
}

BAD_SPLORA = {
    "lora_a-not-tensor": ({"lora_a": 1.0}, TypeError, "lora_a"),
    "lora_a-1d": ({"lora_a": torch.randn(C_IN)}, ValueError, "lora_a"),
    "lora_a-3d-module-layout": ({"lora_a": torch.randn(1, RANK, C_IN)}, ValueError, "lora_a"),
    "lora_b-3d-module-layout": ({"lora_b": torch.randn(1, C_OUT, RANK)}, ValueError, "lora_b"),
    "lora_a-in": ({"lora_a": torch.randn(RANK, C_IN - 1)}, ValueError, "lora_a"),
    "lora_b-rank": ({"lora_b": torch.randn(C_OUT, RANK + 1)}, ValueError, "lora_b"),
    "lora_b-out": ({"lora_b": torch.randn(C_OUT - 1, RANK)}, ValueError, "lora_b"),
    "lora_b-transposed": ({"lora_b": torch.randn(RANK, C_OUT)}, ValueError, "lora_b"),
    "lora_a-without-lora_b": ({"lora_b": None}, ValueError, "lora_b"),
    "lora_b-without-lora_a": ({"lora_a": None}, ValueError, "lora_a"),
    "rank-0-adapter": ({"lora_a": torch.randn(0, C_IN), "lora_b": torch.randn(C_OUT, 0)}, ValueError, "lora_a"),
    "lora_a-float64": ({"lora_a": torch.randn(RANK, C_IN, dtype=torch.float64)}, TypeError, "lora_a"),
    "lora_b-float16": ({"lora_b": torch.randn(C_OUT, RANK).half()}, TypeError, "lora_b"),
    "lora_a-other-device": ({"lora_a": torch.empty(RANK, C_IN, device=META)}, ValueError, "lora_a"),
    "scale-nan": ({"scale": float("nan")}, ValueError, "scale"),
    "scale-inf": ({"scale": math.inf}, ValueError, "scale"),
    "scale-str": ({"scale": "1.0"}, TypeError, "scale"),
    "scale-none": ({"scale": None}, TypeError, "scale"),
    "scale-bool": ({"scale": True}, TypeError, "scale"),
    "scale-tensor": ({"scale": torch.tensor(0.5)}, TypeError, "scale"),
}

BAD_SPPARA = {
    "adapter-none": ({"adapter": None}, TypeError, "adapter"),
    "adapter-1d": ({"adapter": torch.randn(C_OUT)}, ValueError, "adapter"),
    "adapter-3d": ({"adapter": torch.randn(1, C_OUT, C_IN)}, ValueError, "adapter"),
    "adapter-transposed": ({"adapter": torch.randn(C_IN, C_OUT)}, ValueError, "adapter"),
    "adapter-in": ({"adapter": torch.randn(C_OUT, C_IN - 1)}, ValueError, "adapter"),
    "adapter-float64": ({"adapter": torch.randn(C_OUT, C_IN, dtype=torch.float64)}, TypeError, "adapter"),
    "adapter-other-device": ({"adapter": torch.empty(C_OUT, C_IN, device=META)}, ValueError, "adapter"),
}


@pytest.mark.parametrize("case_name", list(BAD_COMMON) + list(BAD_SPLORA))
def test_splora_bad_input_raises_naming_the_argument(case_name):
    change, error, pattern = {**BAD_COMMON, **BAD_SPLORA}[case_name]
    _rejected(call_splora, valid_splora() | change, error, pattern)


@pytest.mark.parametrize("case_name", list(BAD_COMMON) + list(BAD_SPPARA))
def test_sppara_bad_input_raises_naming_the_argument(case_name):
    change, error, pattern = {**BAD_COMMON, **BAD_SPPARA}[case_name]
    _rejected(call_sppara, valid_sppara() | change, error, pattern)


@pytest.mark.parametrize(
    ("fn", "x_shape", "weight_shape", "pattern"),
    [
        (spa_kernels.splora_conv1d, (N, C_IN, H, W), (C_OUT, C_IN, 3), r"\bx must be 3-D"),
        (spa_kernels.splora_conv1d, (N, C_IN, H), (C_OUT, C_IN, 3, 3), "weight must be 3-D"),
        (spa_kernels.splora_conv3d, (N, C_IN, H, W), (C_OUT, C_IN, 3, 3, 3), r"\bx must be 5-D"),
        (spa_kernels.splora_conv3d, (N, C_IN, 3, H, W), (C_OUT, C_IN, 3, 2, 3), "kernel size"),
        (spa_kernels.sppara_conv1d, (N, C_IN, H), (C_OUT, C_IN, 4), "kernel size"),
        (spa_kernels.sppara_conv3d, (N, C_IN, H), (C_OUT, C_IN, 3), r"\bx must be 5-D"),
    ],
    ids=["conv1d-4d-x", "conv1d-4d-weight", "conv3d-4d-x", "conv3d-even-kernel", "sppara1d-even-kernel",
         "sppara3d-3d-x"],
)
def test_dimensionality_must_match_the_function(fn, x_shape, weight_shape, pattern):
    kind = "sppara" if "sppara" in fn.__name__ else "splora"
    arguments = (valid_sppara() if kind == "sppara" else valid_splora()) | {
        "x": torch.randn(x_shape), "weight": torch.randn(weight_shape)}
    call = call_sppara if kind == "sppara" else call_splora
    _rejected(lambda a, backend: call(a, backend, fn=fn), arguments, ValueError, pattern)


def test_trusted_entry_points_still_check_shapes():
    arguments = valid_splora() | {"weight": torch.randn(C_OUT, C_IN)}
    _rejected(lambda a, backend: call_splora(a, backend, fn=functional.splora_conv_trusted), arguments,
              ValueError, "weight")
    arguments = valid_sppara() | {"adapter": torch.randn(C_IN, C_OUT)}
    _rejected(lambda a, backend: call_sppara(a, backend, fn=functional.sppara_conv_trusted), arguments,
              ValueError, "adapter")


# --------------------------------------------------------------------------- groups on fused backends


def _grouped(kind: str) -> dict:
    """Valid depthwise-style arguments: groups=2, weight (C_out, C_in/2, 3, 3)."""
    base = valid_sppara() if kind == "sppara" else valid_splora()
    change = {"groups": 2, "weight": torch.randn(C_OUT, C_IN // 2, 3, 3)}
    if kind == "sppara":
        change["adapter"] = torch.randn(C_OUT, C_IN // 2)
    else:
        change["lora_a"] = torch.randn(RANK, C_IN // 2)
    return base | change


@pytest.mark.parametrize("kind", ["splora", "sppara"])
@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_groups_on_a_named_fused_backend_raises(backend, kind):
    """Named fused backends refuse groups != 1, whether or not they are built here."""
    call = call_sppara if kind == "sppara" else call_splora
    _rejected(call, _grouped(kind), ValueError, "groups=2", backend=backend)


@pytest.mark.parametrize("kind", ["splora", "sppara"])
def test_groups_with_a_forced_fused_backend_raises(kind, monkeypatch):
    """use_backend() and SPA_KERNELS_BACKEND name a backend as explicitly as the argument does."""
    call = call_sppara if kind == "sppara" else call_splora
    with spa_kernels.use_backend("cpu"):
        _rejected(call, _grouped(kind), ValueError, "groups=2")
    monkeypatch.setenv("SPA_KERNELS_BACKEND", "triton")
    _rejected(call, _grouped(kind), ValueError, "groups=2")


@pytest.mark.parametrize("kind", ["splora", "sppara"])
def test_groups_on_the_reference_runs(kind):
    call = call_sppara if kind == "sppara" else call_splora
    with recording_backend_calls() as calls:
        y = call(_grouped(kind), "reference")
    assert calls == ["reference"] and y.shape == (N, C_OUT, H, W)


def test_unknown_backend_name_raises():
    with recording_backend_calls() as calls, pytest.raises(ValueError, match="backend"):
        call_splora(valid_splora(), backend="gpu")
    with pytest.raises(TypeError, match="backend"):
        call_sppara(valid_sppara(), backend=3)
    assert calls == []


# --------------------------------------------------------------------------- accepted input


def _reference(arguments: dict, kind: str = "splora"):
    return (call_sppara if kind == "sppara" else call_splora)(arguments, "reference")


@pytest.mark.parametrize(
    "change",
    [
        {"padding": (1, 1)},
        {"padding": [1, 1]},
        {"padding": "same"},
        {"padding": np.int64(1)},
        {"stride": (1, 1), "dilation": [1, 1]},
        {"stride": np.int32(1), "dilation": torch.Size([1, 1])},
        {"in_idx": torch.tensor([0, 2, 5], dtype=torch.int32)},
        {"in_idx": torch.tensor([0, 9, 2, 9, 5])[::2]},
        {"out_idx": torch.tensor([1, 3], dtype=torch.int32)},
    ],
    ids=["padding-tuple", "padding-list", "padding-same", "padding-numpy", "tuples", "numpy-and-size",
         "in_idx-int32", "in_idx-strided", "out_idx-int32"],
)
def test_equivalent_spellings_are_accepted(change):
    """Tuples, lists, NumPy ints, "same" and int32/strided index lists mean the same call."""
    base = valid_splora()
    expected = _reference(base)
    got = _reference(base | change)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_padding_valid_is_zero_padding():
    arguments = valid_sppara()
    torch.testing.assert_close(_reference(arguments | {"padding": "valid"}, "sppara"),
                               _reference(arguments | {"padding": 0}, "sppara"), rtol=0, atol=0)


def test_empty_index_lists_give_zeros():
    arguments = valid_splora() | {"in_idx": torch.tensor([], dtype=torch.int64),
                                  "out_idx": torch.tensor([], dtype=torch.int32)}
    y = _reference(arguments)
    assert y.shape == (N, C_OUT, H, W) and bool((y == 0).all())


def test_inputs_are_not_modified():
    arguments = valid_splora() | {"in_idx": torch.tensor([0, 2, 5], dtype=torch.int32)}
    before = {k: v.clone() for k, v in arguments.items() if isinstance(v, torch.Tensor)}
    _reference(arguments)
    for name, value in before.items():
        assert arguments[name].dtype == value.dtype and torch.equal(arguments[name], value), name
