"""The contenders of the linear benchmark, all built from the same tensors and masks.

Each contender offers two callables:

* ``forward()``: the layer's output, under ``torch.no_grad()``;
* ``train_step()``: forward, then the gradients of ``loss = (y * g).sum()`` for a
  fixed random ``g``, with respect to ``x``, ``A``, ``B`` and the bias (the base
  weight is frozen).  The gradient is taken as ``torch.autograd.grad(y, inputs, g)``,
  which is that loss's gradient without timing the elementwise product and sum.

Contenders:

* ``spa_kernels[<backend>]``: ``spa_kernels.splora_linear`` on one backend;
* ``compacted``: PyTorch on tensors compacted beforehand (compaction not timed), the
  practical limit of any masked kernel;
* ``dense masked``: full-width GEMMs then masking, what mask-based pruning does;
* ``sp_adapters``: ``sp_adapters.SPLoRALinear`` 0.7.1 in training mode (its
  low-memory path), masks applied around it;
* ``dense F.linear+LoRA``: the unpruned layer, the anchor at keep 1.0.

:func:`check_contender` compares a contender with a float64 evaluation of the
formula in docs/design.md (what is computed) before anything is timed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sp_adapters
import torch
import torch.nn.functional as F
from torch import Tensor

import spa_kernels
from spa_kernels import functional as spa_functional

from .shapes import DATA_SEED, LinearShape, channel_indices

COMPACTED = "compacted"
DENSE_MASKED = "dense masked"
SP_ADAPTERS = "sp_adapters"
DENSE_LORA = "dense F.linear+LoRA"

GRAD_NAMES = ("dx", "dA", "dB", "dbias")


class ContenderMismatch(RuntimeError):
    """A contender's result disagrees with the float64 reference: it must not be timed."""


def spa_kernels_name(backend: str) -> str:
    return f"spa_kernels[{backend}]"


@dataclass
class LinearProblem:
    """One SPLoRA linear layer and its input at one keep ratio, on the benchmark device."""

    shape: LinearShape
    keep: float
    x: Tensor  # (tokens, in)
    weight: Tensor  # (out, in), frozen
    lora_a: Tensor  # (r, in)
    lora_b: Tensor  # (out, r)
    bias: Tensor  # (out,)
    grad_out: Tensor  # (tokens, out): the g of loss = (y * g).sum()
    in_idx: Tensor  # active inputs S, sorted int64
    out_idx: Tensor  # active outputs O, sorted int64

    @classmethod
    def make(cls, shape: LinearShape, keep: float, device: torch.device, dtype: torch.dtype) -> LinearProblem:
        generator = torch.Generator().manual_seed(DATA_SEED)

        def draw(*size: int, std: float) -> Tensor:
            # Drawn in fp32 on the host so every device and dtype sees the same values.
            values = torch.randn(*size, generator=generator) * std
            return values.to(device=device, dtype=dtype)

        tokens, n_in, n_out, rank = shape.tokens, shape.in_features, shape.out_features, shape.rank
        in_idx, out_idx = channel_indices(n_in, n_out, keep)
        return cls(
            shape=shape,
            keep=keep,
            x=draw(tokens, n_in, std=1.0),
            weight=draw(n_out, n_in, std=n_in**-0.5),
            lora_a=draw(rank, n_in, std=n_in**-0.5),
            lora_b=draw(n_out, rank, std=0.5 * rank**-0.5),
            bias=draw(n_out, std=0.1),
            grad_out=draw(tokens, n_out, std=1.0),
            in_idx=in_idx.to(device),
            out_idx=out_idx.to(device),
        )

    @property
    def all_active(self) -> bool:
        return self.in_idx.numel() == self.shape.in_features and self.out_idx.numel() == self.shape.out_features

    def mask(self, idx: Tensor, width: int) -> Tensor:
        """The 0/1 mask of ``idx`` in the compute dtype, as mask-based pruning keeps it."""
        mask = torch.zeros(width, device=self.x.device, dtype=self.x.dtype)
        return mask.index_fill_(0, idx, 1.0)


@dataclass
class Contender:
    name: str
    forward: Callable[[], Tensor]
    train_step: Callable[[], tuple[Tensor, ...]]
    compact: bool = False
    """Results hold the active channels only: ``y[:, O]``, ``dx[:, S]``, ``dA[:, S]``, ``dB[O]``, ``dbias[O]``."""


def _leaf(t: Tensor) -> Tensor:
    return t.detach().clone().contiguous().requires_grad_(True)


def _no_grad(fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
    def forward() -> Tensor:
        with torch.no_grad():
            return fn()

    return forward


def _contender(name: str, layer: Callable[[], Tensor], inputs: tuple[Tensor, ...], grad_out: Tensor,
               compact: bool = False) -> Contender:
    def train_step() -> tuple[Tensor, ...]:
        return torch.autograd.grad(layer(), inputs, grad_out)

    return Contender(name, _no_grad(layer), train_step, compact)


def spa_kernels_contender(p: LinearProblem, backend: str, *, trusted_indices: bool = False) -> Contender:
    """``spa_kernels.splora_linear`` on ``backend``.

    ``trusted_indices`` calls the entry point the nn modules use, which skips the
    index checks that read values (on a GPU those synchronise the host every call).
    """
    x, a, b, bias = _leaf(p.x), _leaf(p.lora_a), _leaf(p.lora_b), _leaf(p.bias)
    weight, in_idx, out_idx = p.weight, p.in_idx, p.out_idx

    trusted_entry = getattr(spa_functional, "_splora_linear_trusted", None) if trusted_indices else None
    if trusted_entry is not None:
        def layer() -> Tensor:
            return trusted_entry(x, weight, a, b, bias, in_idx, out_idx, 1.0, backend)
    else:
        def layer() -> Tensor:
            return spa_kernels.splora_linear(x, weight, a, b, bias, in_idx, out_idx, backend=backend)

    return _contender(spa_kernels_name(backend), layer, (x, a, b, bias), p.grad_out)


def dense_masked_contender(p: LinearProblem) -> Contender:
    """Full-width GEMMs on the masked input, then the output mask."""
    x, a, b, bias = _leaf(p.x), _leaf(p.lora_a), _leaf(p.lora_b), _leaf(p.bias)
    weight = p.weight
    in_mask = p.mask(p.in_idx, p.shape.in_features)
    out_mask = p.mask(p.out_idx, p.shape.out_features)

    def layer() -> Tensor:
        x_masked = x * in_mask
        return (F.linear(x_masked, weight, bias) + F.linear(F.linear(x_masked, a), b)) * out_mask

    return _contender(DENSE_MASKED, layer, (x, a, b, bias), p.grad_out)


def compacted_contender(p: LinearProblem) -> Contender:
    """PyTorch on ``x_S``, ``W_OS``, ``A_S``, ``B_O``, ``b_O`` gathered before timing."""
    in_idx, out_idx = p.in_idx, p.out_idx
    x_s = _leaf(p.x[:, in_idx])
    weight_os = p.weight[out_idx][:, in_idx].contiguous()
    a_s = _leaf(p.lora_a[:, in_idx])
    b_o = _leaf(p.lora_b[out_idx])
    bias_o = _leaf(p.bias[out_idx])
    grad_out_o = p.grad_out[:, out_idx].contiguous()

    def layer() -> Tensor:
        return F.linear(x_s, weight_os, bias_o) + F.linear(F.linear(x_s, a_s), b_o)

    return _contender(COMPACTED, layer, (x_s, a_s, b_o, bias_o), grad_out_o, compact=True)


def sp_adapters_contender(p: LinearProblem) -> Contender:
    """``sp_adapters.SPLoRALinear`` (training mode) with the same parameters, masked outside."""
    shape = p.shape
    layer_module = sp_adapters.SPLoRALinear(shape.in_features, shape.out_features, bias=True, rank=shape.rank)
    return sp_adapters_layer_contender(p, layer_module, shape.in_features, shape.out_features)


def sp_adapters_layer_contender(p, layer_module: torch.nn.Module, in_width: int, out_width: int) -> Contender:
    """An sp_adapters SPLoRA layer loaded with ``p``'s tensors, masked by multiplying in and out."""
    # LowRankMatrix ignores device and dtype arguments, so move the whole layer afterwards.
    layer_module = layer_module.to(device=p.x.device, dtype=p.x.dtype)
    with torch.no_grad():
        layer_module.weight.copy_(p.weight)
        layer_module.bias.copy_(p.bias)
        layer_module.adapter.rows.copy_(p.lora_a[None])
        layer_module.adapter.cols.copy_(p.lora_b[None])
    layer_module.weight.requires_grad_(False)
    layer_module.train()
    x = _leaf(p.x)
    in_mask = p.mask(p.in_idx, in_width)
    out_mask = p.mask(p.out_idx, out_width)

    def layer() -> Tensor:
        return layer_module(x * in_mask) * out_mask

    inputs = (x, layer_module.adapter.rows, layer_module.adapter.cols, layer_module.bias)
    contender = _contender(SP_ADAPTERS, layer, inputs, p.grad_out)
    adapter_grads = contender.train_step

    def train_step() -> tuple[Tensor, ...]:
        dx, d_rows, d_cols, dbias = adapter_grads()
        return dx, d_rows[0], d_cols[0], dbias  # (1, r, in) / (1, out, r) -> A, B shapes

    contender.train_step = train_step
    return contender


def dense_lora_contender(p: LinearProblem) -> Contender:
    """The unpruned layer ``F.linear(x, W, b) + F.linear(F.linear(x, A), B)``: keep 1.0 only."""
    if not p.all_active:
        raise ValueError("the dense F.linear+LoRA anchor has no masks; build it for keep 1.0 only")
    x, a, b, bias = _leaf(p.x), _leaf(p.lora_a), _leaf(p.lora_b), _leaf(p.bias)
    weight = p.weight

    def layer() -> Tensor:
        return F.linear(x, weight, bias) + F.linear(F.linear(x, a), b)

    return _contender(DENSE_LORA, layer, (x, a, b, bias), p.grad_out)


def linear_contenders(p: LinearProblem, backends: list[str], *, trusted_indices: bool = False) -> list[Contender]:
    """Every contender for ``p``, spa_kernels backends first, in table order."""
    contenders = [spa_kernels_contender(p, name, trusted_indices=trusted_indices) for name in backends]
    contenders += [compacted_contender(p), dense_masked_contender(p), sp_adapters_contender(p)]
    if p.all_active:
        contenders.append(dense_lora_contender(p))
    return contenders


# --------------------------------------------------------------------------- checking


@dataclass
class Expected:
    """Float64 output and gradients at full width, exactly zero at pruned entries."""

    y: Tensor
    grads: tuple[Tensor, ...]


def expected_result(p: LinearProblem) -> Expected:
    """The formula of docs/design.md (what is computed) in float64, through autograd."""
    x, a, b, bias = (t.detach().double().requires_grad_(True) for t in (p.x, p.lora_a, p.lora_b, p.bias))
    weight = p.weight.double()
    in_idx, out_idx = p.in_idx, p.out_idx
    x_s = x.index_select(1, in_idx)
    weight_os = weight.index_select(0, out_idx).index_select(1, in_idx)
    y_o = (
        x_s @ weight_os.t()
        + bias.index_select(0, out_idx)
        + (x_s @ a.index_select(1, in_idx).t()) @ b.index_select(0, out_idx).t()
    )
    y = y_o.new_zeros(p.shape.tokens, p.shape.out_features).index_copy(1, out_idx, y_o)
    grads = torch.autograd.grad(y, (x, a, b, bias), p.grad_out.double())
    return Expected(y.detach(), tuple(g.detach() for g in grads))


def _active_blocks(p: LinearProblem, y: Tensor, grads: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """``y[:, O]`` and the active blocks of ``dx, dA, dB, dbias`` from full-width tensors."""
    dx, da, db, dbias = grads
    s, o = p.in_idx, p.out_idx
    return (y[:, o], dx[:, s], da[:, s], db[o], dbias[o])


def _pruned_blocks(p: LinearProblem, y: Tensor, grads: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The entries of full-width results that must be exactly zero.

    Channels are dimension 1 of ``y`` and ``dx`` for linear and convolution layers
    alike, so the widths come from the results themselves.
    """
    dx, da, db, dbias = grads
    in_pruned = torch.ones(dx.shape[1], dtype=torch.bool, device=y.device)
    out_pruned = torch.ones(y.shape[1], dtype=torch.bool, device=y.device)
    in_pruned[p.in_idx] = False
    out_pruned[p.out_idx] = False
    return (y[:, out_pruned], dx[:, in_pruned], da[:, in_pruned], db[out_pruned], dbias[out_pruned])


def tolerance(dtype: torch.dtype) -> float:
    """Largest error allowed relative to the largest reference value.

    Loose enough for any correct kernel in that dtype, tight enough to catch a
    wrong index, a missing term or a stale buffer.
    """
    return {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 3e-2)


def check_contender(contender: Contender, p: LinearProblem, expected: Expected) -> None:
    """Raise :class:`ContenderMismatch` unless ``contender`` computes the layer correctly.

    ``p`` may be any problem with ``keep``, ``x``, ``in_idx`` and ``out_idx`` whose
    results hold channels in dimension 1 (``y``, ``dx``, ``dA``) or 0 (``dB``,
    ``dbias``): the convolution suite checks its contenders here too.
    """
    got_y = contender.forward()
    got_grads = contender.train_step()
    names = ("y",) + GRAD_NAMES
    want = _active_blocks(p, expected.y, expected.grads)
    if contender.compact:
        got = (got_y, *got_grads)
    else:
        got = _active_blocks(p, got_y, got_grads)
        for name, pruned in zip(names, _pruned_blocks(p, got_y, got_grads), strict=True):
            if pruned.numel() and bool(pruned.ne(0).any()):
                raise ContenderMismatch(
                    f"{contender.name} (keep {p.keep}): {name} is not zero at pruned channels "
                    f"(max |value| {pruned.abs().max().item():.3g})"
                )
    limit = tolerance(p.x.dtype)
    for name, g, w in zip(names, got, want, strict=True):
        if tuple(g.shape) != tuple(w.shape):
            raise ContenderMismatch(
                f"{contender.name} (keep {p.keep}): {name} has shape {tuple(g.shape)}, expected {tuple(w.shape)}"
            )
        scale = w.abs().max().item() if w.numel() else 0.0
        error = (g.double() - w).abs().max().item() if w.numel() else 0.0
        if not error <= limit * max(scale, 1e-30):
            raise ContenderMismatch(
                f"{contender.name} (keep {p.keep}): {name} differs from the float64 reference by "
                f"{error:.3g} (largest reference value {scale:.3g}, allowed {limit:g} of it)"
            )
