"""What a pruned SPA model stores per task and what one forward pass costs.

Counts follow docs/design.md section 1 and read each SPA layer's masks: ``|O|`` active
output channels, ``|S|`` active input channels, ``k`` kernel taps (1 for a linear
layer), ``r`` the adapter rank.  Only SPA layers are counted; the rest of a model
(batch norms, plain layers) is the caller's to add.

Stored values per task (:func:`stored_parameters`), ``b`` counted only if the
layer has a bias (as ``sp_adapters.splora.parameters`` does):

* SPLoRA (linear and convolution): ``r·(|S| + |O|) + |O|`` -- ``A[:, S]``, ``B[O]``,
  ``b[O]``; independent of ``k``.
* SPPaRA convolution: ``|O|·|S| + |O|`` -- ``P[O][:, S]``, ``b[O]``.
* ``method="fine-pruning"``, any layer: ``|O|·|S|·k + |O|`` -- the pruned weight
  ``W[O][:, S]`` and ``b[O]`` that a fine-pruned copy of the layer keeps per task.

The channel masks themselves (one bit per channel) are not counted.  In a grouped
convolution an output only reads the inputs of its group, so ``|O|·|S|`` is the
number of active (output, input) pairs ``Σ_g |O_g|·|S_g|``, and the SPLoRA ``|S|``
counts the columns of ``A`` (shared by the groups) that some active input uses.

Cost (:func:`active_macs`, :func:`active_flops`): multiply-accumulates (MACs) of the
SPA layers for one forward, per output position (a linear layer's positions are
its output rows; a convolution's are ``N`` times its output pixels):

* main term, every layer: ``|O|·|S|·k``;
* SPLoRA adapter: ``r·(|S| + |O|)`` (``x_S A_Sᵀ``, then ``B_O`` times that);
* SPPaRA adapter: ``|O|·|S|`` (``P`` as a 1×1 convolution).

Bias additions are not counted.  FLOPs are ``2·MACs``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..nn import ChannelMasked, SPLoRALinear
from ..nn.adapter import LowRankAdapter
from ._layers import checked_spa_layers

METHODS = (None, "fine-pruning")


def _groups(layer: ChannelMasked) -> int:
    return getattr(layer, "groups", 1)


def _kernel_taps(layer: ChannelMasked) -> int:
    return 1 if isinstance(layer, SPLoRALinear) else math.prod(layer.kernel_size)


def _active_counts(layer: ChannelMasked, dense: bool) -> tuple[int, int, int]:
    """``(|O|, |S|, active (output, input) pairs)``; ``dense`` = as if every channel were active."""
    groups = _groups(layer)
    out_mask, in_mask = layer.out_mask, layer.in_mask
    if dense:
        out_mask, in_mask = torch.ones_like(out_mask), torch.ones_like(in_mask)
    out_per_group = out_mask.view(groups, -1).sum(dim=1)
    in_per_group = in_mask.view(groups, -1).sum(dim=1)
    pairs = int((out_per_group * in_per_group).sum())
    return int(out_per_group.sum()), int(in_per_group.sum()), pairs


def _is_low_rank(layer: ChannelMasked) -> bool:
    adapter = getattr(layer, "adapter", None)
    if isinstance(adapter, LowRankAdapter):
        return True
    if isinstance(adapter, Tensor):
        return False
    raise TypeError(f"{type(layer).__name__} has an adapter of unknown kind {type(adapter).__name__}")


def _check_method(method: str | None) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def layer_stored_parameters(layer: ChannelMasked, method: str | None = None) -> int:
    """Values one SPA layer stores per task under its masks (formulas in the module docstring).

    Raises:
        ValueError: ``method`` is not None or ``"fine-pruning"``.
    """
    _check_method(method)
    active_out, _, pairs = _active_counts(layer, dense=False)
    bias = active_out if layer.bias is not None else 0
    if method == "fine-pruning":
        return pairs * _kernel_taps(layer) + bias
    if not _is_low_rank(layer):
        return pairs + bias
    # columns of A that some active input reads (groups = 1: exactly |S|)
    used_columns = int(layer.in_mask.view(_groups(layer), -1).any(dim=0).sum())
    return layer.rank * (used_columns + active_out) + bias


def stored_parameters_by_layer(model: nn.Module, method: str | None = None) -> dict[str, int]:
    """:func:`layer_stored_parameters` of every SPA layer of ``model``, by qualified name.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` has no SPA layers, or ``method`` is unknown.
    """
    _check_method(method)
    return {name: layer_stored_parameters(layer, method) for name, layer in checked_spa_layers(model, "count").items()}


def stored_parameters(model: nn.Module, method: str | None = None) -> int:
    """Values ``model``'s SPA layers store per task: the sum of :func:`stored_parameters_by_layer`.

    Args:
        model: a module holding SPA layers (or one SPA layer).
        method: ``None`` counts each layer as what it is (SPLoRA / SPPaRA);
            ``"fine-pruning"`` counts what a fine-pruned copy of every layer keeps.
    """
    return sum(stored_parameters_by_layer(model, method).values())


# ---------------------------------------------------------------------------- cost


def _output_positions(layer: ChannelMasked, output: Tensor) -> int:
    """Output positions of one call: a linear layer's rows; a convolution's ``N ·`` pixels."""
    if isinstance(layer, SPLoRALinear):
        channels = output.shape[-1]
    else:  # (N, C, *spatial), or unbatched (C, *spatial)
        channels = output.shape[1] if output.dim() == layer._nd + 2 else output.shape[0]
    return output.numel() // channels if channels else 0


def _macs_per_position(layer: ChannelMasked, dense: bool, merged: bool) -> int:
    active_out, active_in, pairs = _active_counts(layer, dense)
    main = pairs * _kernel_taps(layer)
    if merged:
        return main
    if _is_low_rank(layer):
        return main + layer.rank * (active_in + active_out)
    return main + pairs


def _run_forward(model: nn.Module, example_inputs) -> None:
    if isinstance(example_inputs, Tensor):
        model(example_inputs)
    elif isinstance(example_inputs, Mapping):
        model(**example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        model(*example_inputs)
    else:
        raise TypeError("example_inputs must be a Tensor, a tuple/list of positional arguments or a "
                        f"dict of keyword arguments, got {type(example_inputs).__name__}")


def active_macs_by_layer(model: nn.Module, example_inputs, *, dense: bool = False,
                         merged: bool = False) -> dict[str, int]:
    """Multiply-accumulates of each SPA layer in one forward of ``example_inputs``.

    The model runs once under ``torch.no_grad`` and in eval mode (so batch norms
    keep their statistics); each module's training flag is restored afterwards.  A
    layer called several times counts every call; one never called counts 0.

    Args:
        model: a module holding SPA layers.
        example_inputs: a Tensor, a tuple/list of positional arguments, or a dict of
            keyword arguments for ``model``.
        dense: count every channel as active (the unpruned model), for ratios.
        merged: leave out the adapter terms, as after merging the adapters into the
            weights (``to_module`` / ``compact``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``example_inputs`` of no such kind.
        ValueError: ``model`` has no SPA layers.
    """
    layers = checked_spa_layers(model, "count")
    positions = dict.fromkeys(layers, 0)

    def count(name: str):
        def hook(module: ChannelMasked, inputs, output) -> None:
            positions[name] += _output_positions(module, output)

        return hook

    handles = [layer.register_forward_hook(count(name)) for name, layer in layers.items()]
    training = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            _run_forward(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in training.items():
            module.training = mode
    return {name: positions[name] * _macs_per_position(layer, dense, merged) for name, layer in layers.items()}


def active_macs(model: nn.Module, example_inputs, *, dense: bool = False, merged: bool = False) -> int:
    """Multiply-accumulates of ``model``'s SPA layers in one forward: the sum of :func:`active_macs_by_layer`."""
    return sum(active_macs_by_layer(model, example_inputs, dense=dense, merged=merged).values())


def active_flops(model: nn.Module, example_inputs, *, dense: bool = False, merged: bool = False) -> int:
    """Floating-point operations, ``2 ·`` :func:`active_macs` (one multiply and one add per MAC)."""
    return 2 * active_macs(model, example_inputs, dense=dense, merged=merged)


__all__ = [
    "active_flops",
    "active_macs",
    "active_macs_by_layer",
    "layer_stored_parameters",
    "stored_parameters",
    "stored_parameters_by_layer",
]
