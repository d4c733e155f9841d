"""The contenders of the conv2d benchmark, all built from the same tensors and masks.

The convolution counterpart of :mod:`bench.anchors`: the same two callables per
contender (``forward()`` under ``torch.no_grad()``; ``train_step()``, the gradients
of ``loss = (y * g).sum()`` with respect to ``x``, ``A``, ``B`` and the bias, ``W``
frozen) and the same check against a float64 evaluation before timing
(:func:`bench.anchors.check_contender`).

Contenders:

* ``spa_kernels[<backend>]``: ``spa_kernels.splora_conv2d`` on one backend;
* ``compacted``: PyTorch convolutions on tensors compacted beforehand (compaction not
  timed), the adapter as a parallel 1×1 convolution: the practical limit;
* ``dense masked``: full-width convolutions on the masked input, then the output
  mask, what mask-based pruning does;
* ``sp_adapters``: ``sp_adapters.SPLoRAConv2d`` 0.7.1 in training mode (it convolves
  with the adapted weight ``W + centre(BA)``), masks applied around it;
* ``dense conv+LoRA``: the unpruned layer, the anchor at keep 1.0.

The adapter acts at the kernel's centre tap only, which is a 1×1 convolution with
the same stride over the centre-tap input (docs/design.md, what is computed):
:func:`centre_tap_conv` is that convolution.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import sp_adapters
import torch
import torch.nn.functional as F
from torch import Tensor

import spa_kernels
from spa_kernels import functional as spa_functional

from .anchors import (
    COMPACTED,
    DENSE_MASKED,
    Contender,
    Expected,
    _contender,
    _leaf,
    sp_adapters_layer_contender,
    spa_kernels_name,
)
from .shapes import DATA_SEED, Conv2dShape, channel_indices

DENSE_CONV_LORA = "dense conv+LoRA"

# sp_adapters 0.7.1 indexes its centre tap with a list, which torch deprecates; the
# warning says nothing about the benchmark and would land in the middle of the output.
warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")


def centre_tap_padding(kernel_size: int, padding: int, dilation: int = 1) -> int:
    """Padding of the 1×1 convolution that reads the centre tap of a ``kernel_size`` one.

    Output position ``h`` of the k×k convolution reads its centre tap at input row
    ``h·stride − padding + dilation·(k // 2)``; a 1×1 convolution with padding ``p'``
    reads row ``h·stride − p'``.  The output sizes agree as well.
    """
    return padding - dilation * (kernel_size // 2)


def centre_tap_conv(x: Tensor, lora_a: Tensor, lora_b: Tensor, *, kernel_size: int, stride: int = 1,
                    padding: int = 0, dilation: int = 1) -> Tensor:
    """The adapter term ``conv1×1(conv1×1(x, A), B)`` on the centre-tap grid of a k×k convolution.

    ``x`` ``(N, in, H, W)``, ``lora_a`` ``(r, in)``, ``lora_b`` ``(out, r)``.  The stride
    goes on the first 1×1 convolution, so the second one sees the output grid only.
    """
    pad = centre_tap_padding(kernel_size, padding, dilation)
    if pad < 0:  # a "valid" convolution: the centre taps never reach the border rows
        x = x[..., -pad:x.shape[-2] + pad, -pad:x.shape[-1] + pad]
        pad = 0
    low_rank = F.conv2d(x, lora_a[:, :, None, None], stride=stride, padding=pad)
    return F.conv2d(low_rank, lora_b[:, :, None, None])


@dataclass
class ConvProblem:
    """One SPLoRA conv2d layer and its input at one keep ratio, on the benchmark device."""

    shape: Conv2dShape
    keep: float
    x: Tensor  # (N, in, H, W)
    weight: Tensor  # (out, in, k, k), frozen
    lora_a: Tensor  # (r, in)
    lora_b: Tensor  # (out, r)
    bias: Tensor  # (out,)
    grad_out: Tensor  # (N, out, H, W): the g of loss = (y * g).sum()
    in_idx: Tensor
    out_idx: Tensor

    @classmethod
    def make(cls, shape: Conv2dShape, keep: float, device: torch.device, dtype: torch.dtype) -> ConvProblem:
        generator = torch.Generator().manual_seed(DATA_SEED)

        def draw(*size: int, std: float) -> Tensor:
            values = torch.randn(*size, generator=generator) * std  # fp32 on the host: same values everywhere
            return values.to(device=device, dtype=dtype)

        n, c_in, c_out, k, rank = shape.batch, shape.in_channels, shape.out_channels, shape.kernel_size, shape.rank
        in_idx, out_idx = channel_indices(c_in, c_out, keep)
        fan_in = c_in * k * k
        return cls(
            shape=shape,
            keep=keep,
            x=draw(n, c_in, shape.height, shape.width, std=1.0),
            weight=draw(c_out, c_in, k, k, std=fan_in**-0.5),
            lora_a=draw(rank, c_in, std=c_in**-0.5),
            lora_b=draw(c_out, rank, std=0.5 * rank**-0.5),
            bias=draw(c_out, std=0.1),
            grad_out=draw(n, c_out, shape.height, shape.width, std=1.0),
            in_idx=in_idx.to(device),
            out_idx=out_idx.to(device),
        )

    @property
    def all_active(self) -> bool:
        return self.in_idx.numel() == self.shape.in_channels and self.out_idx.numel() == self.shape.out_channels

    def mask(self, idx: Tensor, width: int) -> Tensor:
        """The 0/1 channel mask of ``idx``, shaped ``(width, 1, 1)`` to broadcast over ``(N, C, H, W)``."""
        mask = torch.zeros(width, device=self.x.device, dtype=self.x.dtype)
        return mask.index_fill_(0, idx, 1.0)[:, None, None]


def spa_kernels_conv_contender(p: ConvProblem, backend: str, *, trusted_indices: bool = False) -> Contender:
    """``spa_kernels.splora_conv2d`` on ``backend``.

    ``trusted_indices`` calls the entry point the nn modules use, which skips the
    index checks that read values (on a GPU those synchronise the host every call).
    """
    x, a, b, bias = _leaf(p.x), _leaf(p.lora_a), _leaf(p.lora_b), _leaf(p.bias)
    weight, in_idx, out_idx, padding = p.weight, p.in_idx, p.out_idx, p.shape.padding
    entry = spa_kernels.splora_conv2d
    if trusted_indices:
        entry = getattr(spa_functional, "_splora_conv_trusted", entry)

    def layer() -> Tensor:
        return entry(x, weight, a, b, bias, in_idx, out_idx, padding=padding, backend=backend)

    return _contender(spa_kernels_name(backend), layer, (x, a, b, bias), p.grad_out)


def dense_masked_conv_contender(p: ConvProblem) -> Contender:
    """Full-width convolutions on the masked input, then the output mask."""
    x, a, b, bias = _leaf(p.x), _leaf(p.lora_a), _leaf(p.lora_b), _leaf(p.bias)
    weight, k, padding = p.weight, p.shape.kernel_size, p.shape.padding
    in_mask = p.mask(p.in_idx, p.shape.in_channels)
    out_mask = p.mask(p.out_idx, p.shape.out_channels)

    def layer() -> Tensor:
        x_masked = x * in_mask
        y = F.conv2d(x_masked, weight, bias, padding=padding)
        return (y + centre_tap_conv(x_masked, a, b, kernel_size=k, padding=padding)) * out_mask

    return _contender(DENSE_MASKED, layer, (x, a, b, bias), p.grad_out)


def compacted_conv_contender(p: ConvProblem) -> Contender:
    """PyTorch on ``x_S``, ``W_OS``, ``A_S``, ``B_O``, ``b_O`` gathered before timing."""
    in_idx, out_idx = p.in_idx, p.out_idx
    x_s = _leaf(p.x[:, in_idx])
    weight_os = p.weight[out_idx][:, in_idx].contiguous()
    a_s = _leaf(p.lora_a[:, in_idx])
    b_o = _leaf(p.lora_b[out_idx])
    bias_o = _leaf(p.bias[out_idx])
    grad_out_o = p.grad_out[:, out_idx].contiguous()
    k, padding = p.shape.kernel_size, p.shape.padding

    def layer() -> Tensor:
        y = F.conv2d(x_s, weight_os, bias_o, padding=padding)
        return y + centre_tap_conv(x_s, a_s, b_o, kernel_size=k, padding=padding)

    return _contender(COMPACTED, layer, (x_s, a_s, b_o, bias_o), grad_out_o, compact=True)


def sp_adapters_conv_contender(p: ConvProblem) -> Contender:
    """``sp_adapters.SPLoRAConv2d`` (training mode) with the same parameters, masked outside."""
    shape = p.shape
    layer_module = sp_adapters.SPLoRAConv2d(
        shape.in_channels, shape.out_channels, shape.kernel_size, padding=shape.padding, bias=True, rank=shape.rank
    )
    return sp_adapters_layer_contender(p, layer_module, shape.in_channels, shape.out_channels)


def dense_conv_lora_contender(p: ConvProblem) -> Contender:
    """The unpruned layer ``conv(x, W, b) + conv1×1(conv1×1(x, A), B)``: keep 1.0 only."""
    if not p.all_active:
        raise ValueError("the dense conv+LoRA anchor has no masks; build it for keep 1.0 only")
    x, a, b, bias = _leaf(p.x), _leaf(p.lora_a), _leaf(p.lora_b), _leaf(p.bias)
    weight, k, padding = p.weight, p.shape.kernel_size, p.shape.padding

    def layer() -> Tensor:
        return F.conv2d(x, weight, bias, padding=padding) + centre_tap_conv(x, a, b, kernel_size=k, padding=padding)

    return _contender(DENSE_CONV_LORA, layer, (x, a, b, bias), p.grad_out)


def conv_contenders(p: ConvProblem, backends: list[str], *, trusted_indices: bool = False) -> list[Contender]:
    """Every contender for ``p``, spa_kernels backends first, in table order."""
    contenders = [spa_kernels_conv_contender(p, name, trusted_indices=trusted_indices) for name in backends]
    contenders += [compacted_conv_contender(p), dense_masked_conv_contender(p), sp_adapters_conv_contender(p)]
    if p.all_active:
        contenders.append(dense_conv_lora_contender(p))
    return contenders


def expected_conv_result(p: ConvProblem) -> Expected:
    """docs/design.md (what is computed) in float64, through autograd: one convolution with the effective weight.

    ``W_eff = W_OS`` plus ``B_O A_S`` at the centre tap, on the active channels only;
    an evaluation independent of the parallel 1×1 form the anchors use.
    """
    x, a, b, bias = (t.detach().double().requires_grad_(True) for t in (p.x, p.lora_a, p.lora_b, p.bias))
    in_idx, out_idx, centre = p.in_idx, p.out_idx, p.shape.kernel_size // 2
    weight_os = p.weight.double().index_select(0, out_idx).index_select(1, in_idx)
    centre_tap = torch.zeros_like(weight_os)
    centre_tap[:, :, centre, centre] = 1.0
    adapter_os = b.index_select(0, out_idx) @ a.index_select(1, in_idx)
    weight_eff = weight_os + adapter_os[:, :, None, None] * centre_tap
    y_o = F.conv2d(x.index_select(1, in_idx), weight_eff, bias.index_select(0, out_idx), padding=p.shape.padding)
    y = y_o.new_zeros(p.grad_out.shape).index_copy(1, out_idx, y_o)
    grads = torch.autograd.grad(y, (x, a, b, bias), p.grad_out.double())
    return Expected(y.detach(), tuple(g.detach() for g in grads))


def conv_op_backends(device: torch.device, dtype: torch.dtype,
                     candidates: list[str]) -> tuple[list[str], str | None]:
    """The backends among ``candidates`` that run ``spa_kernels.splora_conv2d`` on ``device`` in ``dtype``.

    Returns them and, when there are none, why.  Backends may implement a subset of the
    ops, so each is asked with a tiny problem.
    """
    if not hasattr(spa_kernels, "splora_conv2d"):
        return [], "spa_kernels.splora_conv2d does not exist in this version"
    x = torch.zeros(1, 2, 3, 3, device=device, dtype=dtype)
    weight = torch.zeros(2, 2, 3, 3, device=device, dtype=dtype)
    a, b = torch.zeros(1, 2, device=device, dtype=dtype), torch.zeros(2, 1, device=device, dtype=dtype)
    usable, reasons = [], []
    for name in candidates:
        try:
            spa_kernels.splora_conv2d(x, weight, a, b, None, None, None, padding=1, backend=name)
        except (ValueError, NotImplementedError, RuntimeError) as error:
            reasons.append(f"{name}: {error}")
        else:
            usable.append(name)
    return usable, (None if usable else "; ".join(reasons) or "no backend is usable")
