"""Bad compact calls fail before any kernel, with errors naming ``x`` and ``compact_input``."""

from __future__ import annotations

import pytest
import torch

from spa_kernels import functional as F


def _linear_operands():
    weight = torch.randn(6, 8)
    return weight, torch.randn(2, 8), torch.randn(6, 2), torch.randn(6)


@pytest.mark.parametrize("width", [8, 2, 4])
def test_linear_wrong_compact_width(width):
    weight, a, b, bias = _linear_operands()
    in_idx = torch.tensor([0, 3, 5])
    with pytest.raises(ValueError, match=r"x has .* channels.*compact_input=True.*in_idx lists 3"):
        F.splora_linear(torch.randn(4, width), weight, a, b, bias, in_idx, None, compact_input=True)


def test_linear_compact_width_with_all_inputs_active_is_the_full_width():
    weight, a, b, bias = _linear_operands()
    y = F.splora_linear(torch.randn(4, 8), weight, a, b, bias, None, None, compact_input=True)
    assert y.shape == (4, 6)
    with pytest.raises(ValueError, match=r"x has 7 channels.*compact_input=True.*every input channel is active"):
        F.splora_linear(torch.randn(4, 7), weight, a, b, bias, None, None, compact_input=True)


def test_linear_full_width_x_is_still_checked_without_compact_input():
    weight, a, b, bias = _linear_operands()
    with pytest.raises(ValueError, match="x has 3 features"):
        F.splora_linear(torch.randn(4, 3), weight, a, b, bias, torch.tensor([0, 1, 2]), None)


def test_linear_trusted_wrong_compact_width():
    weight, a, b, bias = _linear_operands()
    with pytest.raises(ValueError, match=r"x has 8 channels.*compact_input=True"):
        F.splora_linear_trusted(torch.randn(4, 8), weight, a, b, bias, torch.tensor([1, 2]), None, 1.0, None,
                                compact_input=True)


@pytest.mark.parametrize("flag", ["compact_input", "compact_output"])
def test_compact_flags_must_be_bool(flag):
    weight, a, b, bias = _linear_operands()
    with pytest.raises(TypeError, match=f"{flag} must be a bool"):
        F.splora_linear(torch.randn(4, 8), weight, a, b, bias, **{flag: 1})
    with pytest.raises(TypeError, match=f"{flag} must be a bool"):
        F.splora_conv2d(torch.randn(1, 8, 5, 5), torch.randn(6, 8, 3, 3), **{flag: "yes"})


@pytest.mark.parametrize("trusted", [False, True], ids=["public", "trusted"])
def test_conv_wrong_compact_width(trusted):
    x = torch.randn(2, 5, 6, 6)
    weight = torch.randn(4, 8, 3, 3)
    in_idx = torch.tensor([1, 2, 6])
    conv = F.splora_conv_trusted if trusted else F.splora_conv2d
    with pytest.raises(ValueError, match=r"x has 5 channels in dimension 1 but compact_input=True"):
        conv(x, weight, None, None, None, in_idx, None, compact_input=True)
    sppara = F.sppara_conv_trusted if trusted else F.sppara_conv2d
    with pytest.raises(ValueError, match=r"x has 5 channels in dimension 1 but compact_input=True"):
        sppara(x, weight, torch.randn(4, 8), None, in_idx, None, compact_input=True)


def test_conv_full_width_x_is_still_checked_without_compact_input():
    with pytest.raises(ValueError, match="x has 3 channels"):
        F.splora_conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 8, 3, 3), None, None, None,
                        torch.tensor([0, 1, 2]), None)


def test_conv_compact_input_index_checked_against_full_width():
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(IndexError, match="in_idx holds indices"):
        F.splora_conv2d(x, torch.randn(4, 8, 3, 3), None, None, None, torch.tensor([3, 8]), None,
                        compact_input=True)


def test_grouped_conv_compact_width():
    weight = torch.randn(6, 4, 3, 3)  # groups=2: 8 input channels
    y = F.splora_conv2d(torch.randn(1, 3, 5, 5), weight, None, None, None, torch.tensor([0, 5, 7]),
                        torch.tensor([1, 4]), padding=1, groups=2, backend="reference", compact_input=True,
                        compact_output=True)
    assert y.shape == (1, 2, 5, 5)
    with pytest.raises(ValueError, match=r"x has 4 channels.*compact_input=True"):
        F.splora_conv2d(torch.randn(1, 4, 5, 5), weight, None, None, None, torch.tensor([0, 5, 7]), None,
                        groups=2, backend="reference", compact_input=True)
