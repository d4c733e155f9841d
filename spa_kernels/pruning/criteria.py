"""Per-output-channel importance scores of every SPA layer of a model.

A criterion scores each output channel of each SPA layer (higher = more
important); a schedule then prunes the lowest.  Scores are a
``dict[str, Tensor]`` keyed by the layer's qualified name, each a 1-D float64
CPU tensor with one entry per output channel.

Data criteria watch the SPA layers' own outputs ``a`` (forward hooks) and their
gradients ``∂L/∂a`` (tensor hooks on those outputs) while the user runs batches
inside :meth:`Criterion.observe`; no second model is built.  Running sums are
kept per layer in float64 on the CPU; a hook reduces its batch to one value per
channel (or per sample and channel) at once and keeps nothing else, so neither
the graph nor an activation outlives its use.

Layout of a layer output: the channel is dim 1 of a convolution's output
``(N, C, *spatial)`` and the last dim of a linear layer's ``(..., C)``.  The
first dim is the sample (``N``) and the remaining dims are positions; an
unbatched output (a convolution's ``(C, *spatial)``, a linear layer's ``(C,)``)
is one sample.

Conventions shared by every criterion:

* A channel that is pruned (``out_mask`` False) when :meth:`Criterion.scores`
  is called scores exactly 0.  Its activation is zero anyway; its gradient need
  not be, so data criteria zero it explicitly.
* A layer that never ran (data criteria: never ran forward, or for gradient
  criteria never received a gradient) during observation gets **no entry** in
  the scores: an all-zero entry would look like a layer of useless channels and
  invite a schedule to prune it away.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from ..nn import ChannelMasked, SPLoRALinear
from ..nn.adapter import LowRankAdapter
from ._layers import checked_spa_layers

Scores = dict[str, Tensor]

# Rows of a layer whose adapted weight is materialised at once by MagnitudeCriterion:
# bounded by elements so a wide convolution never needs the whole W + BA.
_MAGNITUDE_BLOCK_ELEMENTS = 1 << 22


def _samples_channels_positions(output: Tensor, module: ChannelMasked) -> Tensor:
    """A view of a layer output as ``(N, C, P)``: samples, channels, flattened positions."""
    if isinstance(module, SPLoRALinear):
        if output.dim() == 1:
            return output.view(1, -1, 1)
        return output.reshape(output.shape[0], -1, output.shape[-1]).transpose(1, 2)
    if output.dim() == module._nd + 1:  # unbatched convolution output
        output = output.unsqueeze(0)
    return output.flatten(2)


def _reduction_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 for the per-batch reductions done on the output's device."""
    return torch.promote_types(dtype, torch.float32)


class Criterion:
    """Base of the criteria: ``observe`` / ``scores`` / ``reset`` / ``collect``."""

    def observe(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """Context manager watching ``model``'s SPA layers while the caller runs batches.

        Raises:
            TypeError: ``model`` is not an ``nn.Module``.
            ValueError: ``model`` has no SPA layers.
        """
        raise NotImplementedError

    def scores(self) -> Scores:
        """Scores accumulated so far: qualified layer name -> float64 CPU ``(out_channels,)``."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget everything accumulated."""
        raise NotImplementedError

    def collect(self, model: nn.Module, feed: Callable[[nn.Module], object]) -> Scores:
        """``reset()``, run ``feed(model)`` under ``observe(model)``, return ``scores()``."""
        if not callable(feed):
            raise TypeError(f"feed must be a callable taking the model, got {type(feed).__name__}")
        self.reset()
        with self.observe(model):
            feed(model)
        return self.scores()


# ---------------------------------------------------------------------------- magnitude


def _adapter_rows(module: ChannelMasked, rows: Tensor) -> Tensor:
    """The centre-tap adapter term (``s·B A`` or ``P``) of output rows ``rows``, float64 ``(len, in/groups)``."""
    adapter = module.adapter
    if isinstance(adapter, LowRankAdapter):
        cols = adapter.cols[0].detach().index_select(0, rows).double()
        return (cols @ adapter.rows[0].detach().double()).mul_(module.scale)
    if isinstance(adapter, Tensor):
        return adapter.detach().index_select(0, rows).double()
    raise TypeError(f"{type(module).__name__} has an adapter of unknown kind {type(adapter).__name__}")


def _adapted_row_norms(module: ChannelMasked, rows: Tensor, p: int) -> Tensor:
    """L``p`` norm of each adapted weight row in ``rows`` over its active inputs and every tap."""
    out_channels, in_per_group = module.weight.shape[:2]
    weight = module.weight.detach().index_select(0, rows).double()
    weight = weight.reshape(len(rows), in_per_group, -1)  # (rows, in/groups, taps); linear: 1 tap
    centre = 0 if isinstance(module, SPLoRALinear) else _centre_tap(module.kernel_size)
    weight[:, :, centre] += _adapter_rows(module, rows)
    groups = getattr(module, "groups", 1)
    # active inputs of each row: those of the row's group (groups = 1: the whole in_mask)
    row_group = rows.div(max(out_channels // groups, 1), rounding_mode="floor")
    active_inputs = module.in_mask.view(groups, in_per_group).index_select(0, row_group)
    weight.mul_(active_inputs.to(weight.device).unsqueeze(2))
    if p == 1:
        return weight.abs().sum(dim=(1, 2))
    return weight.square().sum(dim=(1, 2)).sqrt()


def _centre_tap(kernel_size: tuple[int, ...]) -> int:
    """Flat index of the centre tap of an odd kernel."""
    index = 0
    for k in kernel_size:
        index = index * k + k // 2
    return index


class MagnitudeCriterion(Criterion):
    r"""Norm of each output row of the ADAPTED weight over the active input channels.

    For output channel ``o`` the row is ``W[o, S, :]`` with the adapter added at
    the centre tap: ``+ s·(B A)[o, S]`` for SPLoRA (a linear layer is its own
    single tap), ``+ P[o, S]`` for SPPaRA.  Every tap counts.  The score is
    ``‖row‖_p`` (``p`` = 1 or 2), divided (``normalize=True``) by the layer's
    ``‖(‖row_o‖_p)_{o ∈ O}‖_2``, the L2 norm of the raw scores of its active rows,
    so layers of different width and scale meet in one global ranking.  A layer
    whose active rows are all zero keeps raw scores of 0.

    Needs no data: :meth:`observe` only records the model (no hooks) and
    :meth:`scores` reads the weights as they are then.  Rows are computed in
    blocks; the full ``W + B A`` is never built.  Pruned output channels score 0.

    Args:
        p: 1 (L1 norm) or 2 (L2 norm).
        normalize: divide by the layer norm described above.

    Raises:
        ValueError: ``p`` is not 1 or 2.
    """

    def __init__(self, p: int = 2, normalize: bool = True) -> None:
        if isinstance(p, bool) or p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p!r}")
        self.p = int(p)
        self.normalize = bool(normalize)
        self._model: nn.Module | None = None

    @contextlib.contextmanager
    def observe(self, model: nn.Module) -> Iterator[None]:
        checked_spa_layers(model, "score")
        self._model = model
        yield

    def reset(self) -> None:
        self._model = None

    def scores(self, model: nn.Module | None = None) -> Scores:
        """Scores of ``model``'s SPA layers, or of the model last observed if ``model`` is None.

        Raises:
            RuntimeError: no ``model`` given and none observed since the last reset.
        """
        if model is None:
            model = self._model
            if model is None:
                raise RuntimeError("MagnitudeCriterion has no model: pass one to scores() or observe() one")
        return {name: self._layer_scores(layer) for name, layer in checked_spa_layers(model, "score").items()}

    @torch.no_grad()
    def _layer_scores(self, layer: ChannelMasked) -> Tensor:
        out_mask = layer.out_mask.cpu()
        scores = torch.zeros(out_mask.numel(), dtype=torch.float64)
        active = torch.nonzero(out_mask).flatten()
        row_elements = max(layer.weight[0].numel(), 1)
        block = max(1, _MAGNITUDE_BLOCK_ELEMENTS // row_elements)
        for start in range(0, active.numel(), block):
            rows = active[start:start + block]
            scores[rows] = _adapted_row_norms(layer, rows.to(layer.weight.device), self.p).cpu()
        if self.normalize:
            layer_norm = scores.norm()
            if layer_norm > 0:
                scores /= layer_norm
        return scores


# ---------------------------------------------------------------------------- data criteria


class _Sums:
    """Running per-channel sum and the number of terms it holds (its divisor)."""

    __slots__ = ("total", "count")

    def __init__(self, channels: int) -> None:
        self.total = torch.zeros(channels, dtype=torch.float64)
        self.count = 0

    def add(self, per_channel: Tensor, count: int) -> None:
        self.total += per_channel.to(device="cpu", dtype=torch.float64)
        self.count += count


class _Session:
    """The gradient hooks of one ``observe`` block that have not fired yet.

    Each entry holds the tensor hook's handle and what the hook needs from the
    forward pass (the activation, for Taylor).  A hook takes its entry out when it
    fires, so the activation is released as soon as it is used; closing the
    session removes the hooks still waiting, so nothing fires or is held after
    ``observe`` exits.
    """

    def __init__(self) -> None:
        self.pending: dict[int, tuple[torch.utils.hooks.RemovableHandle, Tensor | None]] = {}
        self._keys = itertools.count()

    def next_key(self) -> int:
        return next(self._keys)

    def close(self) -> None:
        for handle, _ in self.pending.values():
            handle.remove()
        self.pending.clear()


class _DataCriterion(Criterion):
    """Hooks on the SPA layers' outputs feeding per-layer running sums."""

    def __init__(self) -> None:
        self._sums: dict[str, _Sums] = {}
        self._layers: dict[str, ChannelMasked] = {}  # last observed: their out_masks zero the scores
        self._observing = False

    def reset(self) -> None:
        self._sums = {}
        self._layers = {}

    def _sums_of(self, name: str, channels: int) -> _Sums:
        sums = self._sums.get(name)
        if sums is None:
            sums = self._sums[name] = _Sums(channels)
        elif sums.total.numel() != channels:
            raise ValueError(f"layer {name!r} now has {channels} output channels, but {sums.total.numel()} "
                             "were accumulated; call reset() before observing a different model")
        return sums

    @contextlib.contextmanager
    def observe(self, model: nn.Module) -> Iterator[None]:
        layers = checked_spa_layers(model, "score")
        if self._observing:
            raise RuntimeError(f"this {type(self).__name__} is already observing a model")
        session = _Session()
        handles = []
        self._layers = layers
        self._observing = True
        try:
            for name, layer in layers.items():
                handles.append(layer.register_forward_hook(self._forward_hook(name, session)))
            yield
        finally:
            for handle in handles:
                handle.remove()
            session.close()
            self._observing = False

    def _forward_hook(self, name: str, session: _Session):
        def hook(module: ChannelMasked, inputs, output) -> None:
            if isinstance(output, Tensor):
                self._on_output(name, module, output, session)

        return hook

    def _on_output(self, name: str, module: ChannelMasked, output: Tensor, session: _Session) -> None:
        raise NotImplementedError

    def scores(self) -> Scores:
        result = {}
        for name, sums in self._sums.items():
            if sums.count == 0:
                continue
            score = sums.total / sums.count
            layer = self._layers.get(name)
            if layer is not None:
                score.masked_fill_(~layer.out_mask.cpu(), 0.0)
            result[name] = score
        return result


class ActivationCriterion(_DataCriterion):
    r"""Activation attention map: ``score_c = mean over samples and positions of |a_c|^p``.

    ``a_c`` is the layer's output channel ``c``.  The mean runs over every
    (sample, position) of every batch observed, so feeding two batches gives
    exactly the score of their concatenation.  Forward passes only; ``torch.no_grad``
    is fine.

    Args:
        p: exponent, a finite number > 0 (2 is the usual attention map).

    Raises:
        ValueError: ``p`` is not a finite number > 0.
    """

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(p) or p <= 0:
            raise ValueError(f"p must be a finite number > 0, got {p!r}")
        self.p = float(p)

    def _on_output(self, name: str, module: ChannelMasked, output: Tensor, session: _Session) -> None:
        with torch.no_grad():
            view = _samples_channels_positions(output.detach(), module)
            magnitude = view.to(_reduction_dtype(view.dtype)).abs()
            powered = magnitude.square() if self.p == 2.0 else magnitude.pow(self.p)
            per_channel = powered.sum(dim=(0, 2))
        self._sums_of(name, view.shape[1]).add(per_channel, view.shape[0] * view.shape[2])


class _GradientBasedCriterion(_DataCriterion):
    """Tensor hooks on each SPA output: ``|per-sample mean over positions of f(a, g)|``, averaged over samples.

    Each forward output counts once, at the first gradient that reaches it (a second
    backward through a retained graph adds nothing).  Outputs that need no gradient
    (``torch.no_grad``, or nothing upstream or in the layer trainable) are skipped.
    """

    _needs_activation = False

    def _on_output(self, name: str, module: ChannelMasked, output: Tensor, session: _Session) -> None:
        if not output.requires_grad:
            return
        # clone: a later in-place op (a fused shift or activation) may change the output; the
        # hook, registered before that, sees the gradient of this very value
        activation = output.detach().clone() if self._needs_activation else None
        key = session.next_key()

        def on_gradient(grad: Tensor) -> None:
            entry = session.pending.pop(key, None)
            if entry is None:  # fired before, or observe() has exited
                return
            with torch.no_grad():
                grad_view = _samples_channels_positions(grad, module)
                dtype = _reduction_dtype(grad_view.dtype)
                term = grad_view.to(dtype)
                if entry[1] is not None:
                    term = term * _samples_channels_positions(entry[1], module).to(dtype)
                per_sample = term.mean(dim=2) if term.shape[2] > 0 else term.sum(dim=2)
                per_channel = per_sample.double().abs().sum(dim=0)
            self._sums_of(name, grad_view.shape[1]).add(per_channel, grad_view.shape[0])

        session.pending[key] = (output.register_hook(on_gradient), activation)


class GradientCriterion(_GradientBasedCriterion):
    r"""Gradient magnitude: ``score_c = mean_n |mean_positions ∂L/∂a_{n,c}|``.

    For each sample ``n`` the gradient of the loss with respect to output channel
    ``c`` is averaged over positions, its absolute value taken, and these are
    averaged over every sample of every batch observed (the per-sample convention of
    :class:`TaylorCriterion`), so feeding two batches gives exactly the score of
    their concatenation when the loss is a sum over samples.  A loss averaged over
    the batch scales each sample's gradient by ``1/N``: keep batch sizes equal, or
    use a summed loss, for batches to weigh the same.

    Run a backward pass inside :meth:`observe` for every forward that should count.
    """


class TaylorCriterion(_GradientBasedCriterion):
    r"""First-order Taylor (Molchanov et al. 2017): ``score_c = mean_n |mean_positions a_{n,c}·∂L/∂a_{n,c}|``.

    For each sample ``n`` the product of output channel ``c`` and its loss gradient is
    averaged over positions and its absolute value taken; these are averaged over
    every sample of every batch observed.  This is the paper's convention (absolute
    value of the per-sample mean over positions, averaged over samples), not the
    absolute value of one mean over everything.  Feeding two batches therefore gives
    exactly the score of their concatenation when the loss is a sum over samples;
    see :class:`GradientCriterion` on batch-averaged losses.

    Each layer output is copied once per forward (in place changes later in the
    model cannot alter it) and released when its gradient arrives or ``observe``
    exits.
    """

    _needs_activation = True


__all__ = [
    "ActivationCriterion",
    "Criterion",
    "GradientCriterion",
    "MagnitudeCriterion",
    "Scores",
    "TaylorCriterion",
]
