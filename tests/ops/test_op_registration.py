"""How the ops are registered with the dispatcher (``spa_kernels/ops/library.py``).

The ops are defined with ``torch.library.Library`` rather than ``custom_op``;
these checks pin down what ``custom_op`` would give for free: the ``pt2_compliant``
tag, a kernel for every device, a fake kernel, an autograd kernel, and outputs
that need a gradient exactly when an input does and grad mode is on.
"""

from __future__ import annotations

import pytest
import torch

import spa_kernels  # noqa: F401  (registers the ops)

OP_NAMES = (
    "splora_linear", "splora_linear_backward", "splora_conv", "splora_conv_backward",
    "sppara_conv", "sppara_conv_backward",
)


@pytest.mark.parametrize("name", OP_NAMES)
def test_op_has_every_registration(name):
    op = getattr(torch.ops.spa_kernels, name).default
    assert torch.Tag.pt2_compliant_tag in op.tags
    for key in ("CompositeExplicitAutograd", "Autograd", "Meta"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key), f"{name}: no {key} kernel"


def _conv_call(x, weight, lora_a, lora_b):
    return torch.ops.spa_kernels.splora_conv(
        x, weight, lora_a, lora_b, None, None, None, [1, 1], [1, 1], [1, 1], 1, 1.0, "reference"
    )


def test_output_needs_grad_only_when_an_input_does_and_grad_mode_is_on():
    x = torch.randn(1, 3, 4, 4)
    weight = torch.randn(2, 3, 3, 3)
    lora_a = torch.randn(1, 3, requires_grad=True)
    lora_b = torch.randn(2, 1, requires_grad=True)
    assert _conv_call(x, weight, lora_a, lora_b).requires_grad
    assert not _conv_call(x, weight, lora_a.detach(), lora_b.detach()).requires_grad
    with torch.no_grad():
        assert not _conv_call(x, weight, lora_a, lora_b).requires_grad
    with torch.inference_mode():
        assert not _conv_call(x, weight, lora_a, lora_b).requires_grad


def test_gradient_flows_only_to_inputs_that_need_it():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    lora_a = torch.randn(1, 3, dtype=torch.float64)
    lora_b = torch.randn(2, 1, dtype=torch.float64, requires_grad=True)
    _conv_call(x, weight, lora_a, lora_b).sum().backward()
    assert x.grad is not None and lora_b.grad is not None
    assert weight.grad is None and lora_a.grad is None
