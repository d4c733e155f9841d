"""The short road of the trusted convolution checks decides sooner, never differently.

``_module_conv_call_is_valid`` accepts the common module call so that the general
checks can be skipped.  Every call it accepts must pass the general checks with
the same normalised result, it must accept what the modules pass, and every
variation away from that (each a bad or merely unusual call) must go down the
general path, which raises the usual error naming the argument.  Every test runs
both forms of the check: the extension's (C++) and the Python one.
"""

from __future__ import annotations

import pytest
import torch

from spa_kernels import _extension, _validation
from spa_kernels.functional import splora_conv_trusted, sppara_conv_trusted
from spa_kernels.nn import SPLoRAConv2d, SPPaRAConv2d

N, C_IN, C_OUT, RANK, SIZE = 2, 6, 5, 3, 5


@pytest.fixture(autouse=True, params=["extension", "python"])
def check_form(request, monkeypatch):
    """Runs each test with the C++ form of the check, and again with the Python form."""
    if request.param == "extension" and _validation._conv_call_is_valid is None:
        pytest.skip(f"the extension is not built: {_extension.BUILD_ERROR}")
    if request.param == "python":
        monkeypatch.setattr(_validation, "_conv_call_is_valid", None)
    return request.param


def _splora_call(**change) -> dict:
    call = {
        "x": torch.randn(N, C_IN, SIZE, SIZE), "weight": torch.randn(C_OUT, C_IN, 3, 3),
        "lora_a": torch.randn(RANK, C_IN), "lora_b": torch.randn(C_OUT, RANK), "bias": torch.randn(C_OUT),
        "stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1,
    }
    return call | change


def _fast(call: dict) -> bool:
    rank = call["lora_a"].shape[0]
    shapes = ((rank, call["weight"].shape[1]), (call["weight"].shape[0], rank))
    return _validation._module_conv_call_is_valid(
        call["x"], call["weight"], call["bias"], (call["lora_a"], call["lora_b"]), shapes,
        call["stride"], call["padding"], call["dilation"], call["groups"])


def _general(call: dict):
    return _validation.check_splora_conv_args(
        2, call["x"], call["weight"], call["lora_a"], call["lora_b"], call["bias"], None, None,
        call["stride"], call["padding"], call["dilation"], call["groups"], 1.0)


VARIATIONS = {
    "x-channels": {"x": torch.randn(N, C_IN + 1, SIZE, SIZE)},
    "x-3d": {"x": torch.randn(C_IN, SIZE, SIZE)},
    "x-float64": {"x": torch.randn(N, C_IN, SIZE, SIZE, dtype=torch.float64)},
    "x-int": {"x": torch.ones(N, C_IN, SIZE, SIZE, dtype=torch.int64)},
    "x-meta": {"x": torch.empty(N, C_IN, SIZE, SIZE, device="meta")},
    "x-too-small": {"x": torch.randn(N, C_IN, 1, 1), "padding": (0, 0)},
    "bias-shape": {"bias": torch.randn(C_OUT + 1)},
    "bias-float64": {"bias": torch.randn(C_OUT, dtype=torch.float64)},
    "lora_b-shape": {"lora_b": torch.randn(C_OUT + 1, RANK)},
    "lora_a-float16": {"lora_a": torch.randn(RANK, C_IN).half()},
    "even-kernel": {"weight": torch.randn(C_OUT, C_IN, 2, 2)},
    "stride-0": {"stride": (0, 1)},
    "padding-negative": {"padding": (-1, 1)},
    "padding-same": {"padding": "same"},
    "stride-list": {"stride": [1, 1]},
    "stride-int": {"stride": 1},
    "stride-bool": {"stride": (True, 1)},
    "stride-too-long": {"stride": (1, 1, 1)},
    "dilation-float": {"dilation": (1.0, 1)},
    "bias-not-a-tensor": {"bias": [0.0] * C_OUT},
    "groups-2": {"groups": 2, "weight": torch.randn(C_OUT + 1, C_IN // 2, 3, 3),
                 "lora_b": torch.randn(C_OUT + 1, RANK), "lora_a": torch.randn(RANK, C_IN // 2),
                 "bias": torch.randn(C_OUT + 1)},
}


def test_the_common_call_takes_the_short_road_with_the_general_result():
    for change in ({}, {"bias": None}, {"stride": (2, 2)}, {"dilation": (2, 1), "padding": (2, 1)}):
        call = _splora_call(**change)
        assert _fast(call)
        assert _general(call) == (None, None, call["stride"], call["padding"], call["dilation"], 1, 1.0)


@pytest.mark.parametrize("name", list(VARIATIONS))
def test_every_variation_goes_down_the_general_path(name):
    assert not _fast(_splora_call(**VARIATIONS[name]))


# The unusual but valid ones aside, and a meta x, which autocast's device lookup refuses first.
@pytest.mark.parametrize("name", [n for n in VARIATIONS if n not in ("padding-same", "stride-list", "stride-int",
                                                                     "groups-2", "x-meta")])
def test_bad_calls_of_the_trusted_entry_point_raise_as_before(name):
    call = _splora_call(**VARIATIONS[name])
    with pytest.raises((TypeError, ValueError)) as general_error:
        _general(call)
    with pytest.raises(type(general_error.value)) as trusted_error:
        splora_conv_trusted(call["x"], call["weight"], call["lora_a"], call["lora_b"], call["bias"],
                            stride=call["stride"], padding=call["padding"], dilation=call["dilation"],
                            groups=call["groups"], backend="reference")
    assert str(trusted_error.value) == str(general_error.value)


def test_modules_pass_what_the_short_road_accepts(monkeypatch):
    accepted = []
    original = _validation._module_conv_call_is_valid

    def recording(*args):
        accepted.append(original(*args))
        return accepted[-1]

    monkeypatch.setattr(_validation, "_module_conv_call_is_valid", recording)
    x = torch.randn(N, C_IN, SIZE, SIZE)
    for layer in (SPLoRAConv2d(C_IN, C_OUT, 3, padding=1, rank=RANK), SPLoRAConv2d(C_IN, C_OUT, 3, bias=False),
                  SPPaRAConv2d(C_IN, C_OUT, 3, padding="same", stride=1)):
        layer(x)
    assert accepted == [True, True, True]


def test_sppara_adapter_of_the_wrong_shape_is_still_refused():
    x, weight = torch.randn(N, C_IN, SIZE, SIZE), torch.randn(C_OUT, C_IN, 3, 3)
    with pytest.raises(ValueError, match="adapter"):
        sppara_conv_trusted(x, weight, torch.randn(C_IN, C_OUT), None, padding=(1, 1), backend="reference")
