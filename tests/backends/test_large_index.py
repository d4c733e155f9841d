"""Outputs of more than 2³¹ elements on the cpu backend: the element offsets must be 64-bit.

Two active output channels out of 32769 over 65536 rows (linear) or 65536 pixels
(conv) keep the arithmetic tiny while the output, in bfloat16, spans 2³¹ + 65536
elements (4 GiB).  One active channel is the last, so the last element of the
output is a computed value, far past the 32-bit range.  Values at the far end are
checked against float64 computed on those rows (or that channel) alone, the
gradients against float64 sums over the gathered active columns, and the pruned
channels, everywhere, must be exact zeros: an offset that wrapped would put values
where zeros belong, or write outside the tensor (which ``make sanitize`` reports).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import spa_kernels
from spa_kernels.backend import cpu as cpu_backend

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not cpu_backend.BUILT, reason="the cpu backend is not built"),
]

ROWS = 1 << 16
OUT_FEATURES = (1 << 15) + 1  # ROWS * OUT_FEATURES = 2**31 + 65536
IN_FEATURES = 16
RANK = 2
SCALE = 0.5
IN_IDX = torch.tensor([3, 11])
OUT_IDX = torch.tensor([5, OUT_FEATURES - 1])
DTYPE = torch.bfloat16
# bfloat16 results of float32 accumulation: a relative error of a few 2⁻⁸ of the
# sum of absolute terms.
RELATIVE_TOLERANCE = 2e-2


def _assert_close(name: str, got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor) -> None:
    error = (got.double() - want).abs()
    allowed = RELATIVE_TOLERANCE * magnitude + 1e-6
    worst = int((error - allowed).argmax())
    assert bool((error <= allowed).all()), (
        f"{name}: error {error.flatten()[worst]:.3g} > {allowed.flatten()[worst]:.3g} at flat index {worst}"
    )


def _count_nonzero_by_rows(y: torch.Tensor, rows_per_chunk: int = 4096) -> int:
    """count_nonzero without a temporary the size of ``y``."""
    return sum(int(torch.count_nonzero(chunk)) for chunk in y.split(rows_per_chunk))


def _nonzero_operands(shape: tuple[int, ...]) -> torch.Tensor:
    """Values away from zero, so that an exact zero in an active position means 'not written'."""
    signs = torch.randint(0, 2, shape).double() * 2 - 1
    return (signs * (0.5 + torch.rand(shape, dtype=torch.float64))).to(DTYPE)


def test_linear_output_past_2_31_elements():
    assert ROWS * OUT_FEATURES > 2**31
    x = _nonzero_operands((ROWS, IN_FEATURES)).requires_grad_()
    weight = _nonzero_operands((OUT_FEATURES, IN_FEATURES))
    lora_a = _nonzero_operands((RANK, IN_FEATURES)).requires_grad_()
    lora_b = _nonzero_operands((OUT_FEATURES, RANK)).requires_grad_()
    bias = _nonzero_operands((OUT_FEATURES,)).requires_grad_()

    y = spa_kernels.splora_linear(x, weight, lora_a, lora_b, bias, IN_IDX, OUT_IDX, scale=SCALE, backend="cpu")
    assert y.shape == (ROWS, OUT_FEATURES)

    # Everything below uses the active channels only, in float64.
    x_s = x.detach().double()[:, IN_IDX]
    a_s = lora_a.detach().double()[:, IN_IDX]
    b_o = lora_b.detach().double()[OUT_IDX]
    w_eff = weight.double()[OUT_IDX][:, IN_IDX] + SCALE * b_o @ a_s  # (|O|, |S|)
    bias_o = bias.detach().double()[OUT_IDX]

    # The last rows, from just below the 2**31-th element to the very last one.
    first_far_row = 2**31 // OUT_FEATURES - 2
    far = slice(first_far_row, ROWS)
    want_far = x_s[far] @ w_eff.t() + bias_o
    _assert_close("y[far rows, active]", y.detach()[far][:, OUT_IDX], want_far,
                  x_s[far].abs() @ w_eff.abs().t() + bias_o.abs())
    assert y[-1, -1].item() != 0, "the last element of the output was not written"

    y_o = y.detach()[:, OUT_IDX]  # (ROWS, |O|), small
    assert torch.count_nonzero(y_o) == y_o.numel(), "an active output is exactly zero: not written"
    assert _count_nonzero_by_rows(y.detach()) == y_o.numel(), "a pruned output is not exactly zero"

    # grad_out = y itself: a second 2**31-element operand, read through the same offsets.
    grad_x, grad_a, grad_b, grad_bias = torch.autograd.grad(y, (x, lora_a, lora_b, bias), grad_outputs=y.detach())
    g_o = y_o.double()
    t = x_s @ a_s.t()  # (ROWS, RANK)
    _assert_close("grad_x[far rows, active]", grad_x[far][:, IN_IDX], g_o[far] @ w_eff,
                  g_o[far].abs() @ w_eff.abs())
    _assert_close("grad_bias[active]", grad_bias[OUT_IDX], g_o.sum(0), g_o.abs().sum(0))
    _assert_close("grad_lora_b[active]", grad_b[OUT_IDX], SCALE * g_o.t() @ t, SCALE * g_o.abs().t() @ t.abs())
    _assert_close("grad_lora_a[active]", grad_a[:, IN_IDX], SCALE * (g_o @ b_o).t() @ x_s,
                  SCALE * (g_o.abs() @ b_o.abs()).t() @ x_s.abs())
    for name, grad, idx, dim in (("grad_x", grad_x, IN_IDX, 1), ("grad_bias", grad_bias, OUT_IDX, 0),
                                 ("grad_lora_b", grad_b, OUT_IDX, 0), ("grad_lora_a", grad_a, IN_IDX, 1)):
        pruned = torch.ones(grad.shape[dim], dtype=torch.bool)
        pruned[idx] = False
        assert not grad.index_select(dim, pruned.nonzero().flatten()).any(), f"{name}: pruned entries not zero"


def test_conv2d_output_past_2_31_elements():
    channels_in, side = 4, 256
    assert OUT_FEATURES * side * side > 2**31
    in_idx = torch.tensor([1, 2])
    x = _nonzero_operands((1, channels_in, side, side))
    weight = _nonzero_operands((OUT_FEATURES, channels_in, 3, 3))
    lora_a = _nonzero_operands((RANK, channels_in))
    lora_b = _nonzero_operands((OUT_FEATURES, RANK))
    bias = _nonzero_operands((OUT_FEATURES,))

    y = spa_kernels.splora_conv2d(x, weight, lora_a, lora_b, bias, in_idx, OUT_IDX, scale=SCALE,
                                  padding=1, backend="cpu")
    assert y.shape == (1, OUT_FEATURES, side, side)

    # The adapter sits at the kernel's centre tap; float64 on the active channels only.
    w_active = weight.double()[OUT_IDX][:, in_idx].clone()
    w_active[:, :, 1, 1] += SCALE * lora_b.double()[OUT_IDX] @ lora_a.double()[:, in_idx]
    x_active = x.double()[:, in_idx]
    want = F.conv2d(x_active, w_active, bias.double()[OUT_IDX], padding=1)
    magnitude = F.conv2d(x_active.abs(), w_active.abs(), bias.double()[OUT_IDX].abs(), padding=1)
    # The last channel's plane starts past element 2**31; the first is checked too.
    _assert_close("y[active channels]", y[:, OUT_IDX], want, magnitude)
    assert y[0, -1, -1, -1].item() != 0, "the last element of the output was not written"
    assert _count_nonzero_by_rows(y[0]) == want.numel(), "a pruned channel is not exactly zero"
