"""``compact(model, example_inputs)``: the physically smaller plain-PyTorch model of a pruned one.

Every SPA layer is merged into its torch layer (``to_module()``: ``W + s·B A`` on the
active block, zeros elsewhere); an SPA attention layer with pruned heads becomes a
:class:`~spa_kernels.nn.PrunedHeadsAttention` holding the kept heads only (torch's
attention cannot have fewer heads than its width implies).  The norm hooks are dropped,
and then the pruned output channels of every SPA layer are removed for real with
torch-pruning's dependency graph, which carries each removal to everything tied to
those channels: the consumers' input channels, norm layers, residual partners, a
plain head.  A pruned channel is exactly
zero in the masked model wherever it flows, so removing it changes no output.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .compact_activations import expand_activations
from .freeze import inside_any
from .nn import ChannelMasked, PrunedHeadsAttention, SPLoRAMultiheadAttention
from .pruning import remove_norm_masks


def _run(model: nn.Module, inputs: Tensor | Sequence | Mapping):
    if isinstance(inputs, Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, Sequence):
        return model(*inputs)
    raise TypeError(f"example_inputs must be a tensor, a tuple/list or a dict, got {type(inputs).__name__}")


def _plain_module(layer: nn.Module) -> nn.Module:
    """The merged plain module of an SPA module: attention with pruned heads holds the kept ones only."""
    if isinstance(layer, SPLoRAMultiheadAttention) and not bool(layer.head_mask.all()):
        return PrunedHeadsAttention.from_module(layer)
    return layer.to_module()


def _merged(model: nn.Module, names: list[str]) -> nn.Module:
    """A deep copy of ``model`` with every named SPA module replaced by its merged plain module."""
    plain = copy.deepcopy(model)
    expand_activations(plain)  # plain torch norms, not norms that follow an SPA layer's index list
    remove_norm_masks(plain)
    for name in names:
        layer = plain.get_submodule(name)
        merged = _plain_module(layer).train(layer.training)
        if name == "":
            return merged
        parent_name, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent_name), child, merged)
    return plain


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def compact(model: nn.Module, example_inputs: Tensor | Sequence | Mapping, *, keep_width: Iterable[str] = ()) -> nn.Module:
    """The plain-PyTorch model holding only the active channels of ``model``.

    Args:
        model: a converted and pruned model whose producers' output masks agree with
            their consumers' input masks (as :meth:`ChannelGroup.apply` leaves them);
            not modified.
        example_inputs: one forward's inputs (a tensor, a tuple/list of positional
            inputs or a dict of keyword inputs), used to trace the channel couplings.
        keep_width: names of SPA layers whose outputs keep their full width (merged,
            with zeros at the pruned channels), with everything tied to them: for
            attention projections pruned inside heads, whose outputs a per-head
            reshape reads.

    Returns:
        A model without SPA layers whose outputs equal ``model``'s in eval mode (up to
        the rounding of sums that no longer add zeros); the same training mode.

    Raises:
        ValueError: ``model`` has no SPA layer, the masks of tied layers disagree so
            that a channel cannot be removed everywhere at once, or removing a layer's
            channels breaks the forward (a per-head reshape: name it in ``keep_width``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    import torch_pruning as tp

    # An SPA attention module is merged as one module: a PrunedHeadsAttention holding the
    # kept heads where heads are pruned, else an nn.MultiheadAttention.  Channels pruned inside
    # kept heads stay, as zeros: every head of a layer has one width.
    attention = [name for name, module in model.named_modules() if isinstance(module, SPLoRAMultiheadAttention)]
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, ChannelMasked) and not inside_any(name, attention)}
    if not layers and not attention:
        raise ValueError("model has no SPA layers to compact; convert and prune it first")
    keep_width = {keep_width} if isinstance(keep_width, str) else set(keep_width)
    unknown = keep_width - set(layers)
    if unknown:
        raise ValueError(f"keep_width: {sorted(unknown)} are not SPA layers of the model")
    masks = {name: layer.out_mask.detach().cpu() for name, layer in layers.items() if name not in keep_width}
    plain = _merged(model, attention + list(layers))
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(plain, example_inputs=example_inputs, forward_fn=_run,
                                                      verbose=False)
    for name, out_mask in masks.items():
        module = plain.get_submodule(name)
        total, kept, current = out_mask.numel(), int(out_mask.sum()), _out_channels(module)
        if kept == total or current == kept:
            continue  # nothing pruned, or already removed through a tied layer
        if current != total:
            raise ValueError(f"compact: layer {name!r} keeps {kept} of {total} output channels, but removing "
                             f"its tied layers' channels left it {current}: the masks of tied layers disagree")
        prune = tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels
        group = graph.get_pruning_group(module, prune, idxs=(~out_mask).nonzero().flatten().tolist())
        if not graph.check_pruning_group(group):
            raise ValueError(f"compact: the output channels of {name!r} cannot be removed (they would empty "
                             "a layer tied to them)")
        group.prune()
        try:
            with torch.no_grad():
                _run(plain, example_inputs)
        except RuntimeError as error:
            raise ValueError(f"compact: removing the pruned output channels of {name!r} breaks the forward "
                             f"({error}); if they feed a per-head reshape, prune whole heads or name the "
                             "layer and its tied layers in keep_width") from None
    return plain


__all__ = ["compact"]
