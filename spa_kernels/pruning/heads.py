"""Attention heads as pruning units, and attention cores that skip pruned heads.

:func:`attention_blocks` finds the attention layers of a converted model: our
:class:`~spa_kernels.nn.SPLoRAMultiheadAttention`, and Hugging Face attention modules
whose projections became :class:`~spa_kernels.nn.SPLoRALinear` (children ``q_proj``,
``k_proj``, ``v_proj``, ``o_proj`` as in ViT and Llama; or ``query``, ``key``, ``value``
with the out projection at the parent's ``output.dense`` as in BERT).

Channels of one attention layer are tied in ways torch-pruning's graph does not see:

* **whole heads** (``whole_heads=True``): one unit per key/value head, holding its q,
  k and v rows and the out-projection columns of its query heads (one query head per
  unit without grouped-query attention).  A pruned unit is the dense model with those
  heads' outputs zeroed: q·k is still scaled by the unpruned head width.
* **channels inside heads** (``whole_heads=False``): q and k keep the same channels in
  each head (a score is a sum over the channels both keep), v and the out projection's
  input the same channels.  Under rotary position embeddings (detected by a
  ``position_embeddings`` argument of the module's ``forward``) channel ``j`` of a head is
  rotated together with ``j + head_dim/2``, so those two are pruned together.

**Cost in Hugging Face's own core.**  The projections compute only their active rows
either way.  :func:`skip_pruned_heads` also makes the scores, softmax and weighted sum
run over the active heads only: forward hooks hand the core the active heads of q, k
and v, and a pre-hook on the out projection puts zeros back at the pruned heads.  This
relies on the attention module reshaping its projections with ``-1`` heads and
flattening the core's output back (``transformers`` 5 does so for ViT, BERT and Llama);
a module that reshapes with a fixed head count fails loudly in ``view`` instead of
computing something else.  A head is skipped when its value rows, or its out-projection
columns, are all pruned: its output is then zero whatever its scores.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..nn import SPLoRALinear, SPLoRAMultiheadAttention

logger = logging.getLogger("spa_kernels")

HF_PROJECTION_NAMES: tuple[tuple[str, str, str, str | None], ...] = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # ViT (transformers 5), Llama, Mistral, Qwen2
    ("query", "key", "value", None),  # BERT, RoBERTa: the out projection is the parent's output.dense
)
HEAD_COUNT_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_heads")
HEAD_WIDTH_ATTRIBUTES = ("head_dim", "attention_head_size")

# A group's channel maps as (group index, layer index, layer channel count), by layer name.
RawMaps = dict[str, tuple[Tensor, Tensor, int]]


@dataclass(frozen=True)
class AttentionBlock:
    """One attention layer: the qualified names of its module and projections, and its head layout."""

    name: str
    q: str
    k: str
    v: str
    out: str
    heads: int
    kv_heads: int
    head_dim: int
    rotary: bool
    ours: bool

    def channel_maps(self, whole_heads: bool) -> list[tuple[int, RawMaps, RawMaps]]:
        """``(size, producer maps, consumer maps)`` of every group of this block."""
        d = self.head_dim
        if whole_heads:
            return [self._group(1, torch.zeros(d, dtype=torch.int64), (self.q, self.k, self.v), True)]
        if self.rotary:
            within_head = torch.arange(d) % (d // 2)
            qk_width = d // 2
        else:
            within_head, qk_width = torch.arange(d), d
        return [
            self._group(qk_width, within_head, (self.q, self.k), False),
            self._group(d, torch.arange(d), (self.v,), True),
        ]

    def _group(self, width: int, within_head: Tensor, producers: tuple[str, ...],
               with_out: bool) -> tuple[int, RawMaps, RawMaps]:
        """A group of ``kv_heads·width`` channels: channel ``p`` of key/value head ``u`` is
        group channel ``u·width + within_head[p]``; query head ``h`` belongs to ``h // rep``."""
        d, rep = self.head_dim, self.heads // self.kv_heads

        def layer_map(query_side: bool) -> tuple[Tensor, Tensor, int]:
            heads = self.heads if query_side else self.kv_heads
            unit = torch.arange(heads) // (rep if query_side else 1)
            group_index = (unit.unsqueeze(1) * width + within_head.unsqueeze(0)).flatten()
            return group_index, torch.arange(heads * d), heads * d

        outs = {name: layer_map(name == self.q) for name in producers}
        ins = {self.out: layer_map(True)} if with_out else {}
        return self.kv_heads * width, outs, ins


def _head_count(module: nn.Module, model: nn.Module) -> int | None:
    for owner in (module, getattr(module, "config", None), getattr(model, "config", None)):
        for attribute in HEAD_COUNT_ATTRIBUTES:
            value = getattr(owner, attribute, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _hf_block(name: str, module: nn.Module, model: nn.Module, modules: dict[str, nn.Module]) -> AttentionBlock | None:
    prefix = f"{name}." if name else ""
    for q, k, v, out in HF_PROJECTION_NAMES:
        if not all(isinstance(getattr(module, child, None), nn.Module) for child in (q, k, v)):
            continue
        if out is None:
            parent = name.rpartition(".")[0]
            out_name = f"{parent}.output.dense" if parent else "output.dense"
        else:
            out_name = prefix + out
        names = (prefix + q, prefix + k, prefix + v, out_name)
        layers = [modules.get(n) for n in names]
        if not all(type(layer) is SPLoRALinear for layer in layers):
            logger.debug("attention %s: projections are not all SPLoRALinear; not head-prunable", name)
            return None
        heads = _head_count(module, model)
        if heads is None or layers[0].out_features % heads:
            logger.debug("attention %s: no head count dividing its width; not head-prunable", name)
            return None
        head_dim = next((getattr(module, a) for a in HEAD_WIDTH_ATTRIBUTES if isinstance(getattr(module, a, None), int)),
                        layers[0].out_features // heads)
        kv_width = layers[1].out_features
        if (layers[0].out_features != heads * head_dim or kv_width % head_dim or layers[2].out_features != kv_width
                or heads % (kv_width // head_dim) or layers[3].in_features != heads * head_dim):
            logger.debug("attention %s: projection shapes do not fit %d heads of %d", name, heads, head_dim)
            return None
        rotary = "position_embeddings" in inspect.signature(type(module).forward).parameters
        if rotary and head_dim % 2:
            logger.debug("attention %s: rotary embeddings with an odd head width", name)
            return None
        return AttentionBlock(name, *names, heads, kv_width // head_dim, head_dim, rotary, False)
    return None


def attention_projections(model: nn.Module) -> set[str]:
    """Qualified names of the q, k and v projections of every attention layer of ``model``.

    Every module with q/k/v children named as in ``HF_PROJECTION_NAMES`` counts, whether or
    not :func:`attention_blocks` can prune its heads: their output channels enter an attention
    core (scores, rotary embeddings, a softmax), which does not act channel by channel.
    """
    names = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for children in HF_PROJECTION_NAMES:
            if all(isinstance(getattr(module, child, None), nn.Module) for child in children[:3]):
                names.update(prefix + child for child in children[:3])
    return names


def attention_blocks(model: nn.Module, skip: Iterable[str] = ()) -> list[AttentionBlock]:
    """The attention layers of ``model`` whose heads can be pruned (see the module doc), in module order.

    Layers named in ``skip``, or inside a module named there, are left out.
    """
    modules = dict(model.named_modules())
    skip = tuple(skip)
    blocks = []
    for name, module in modules.items():
        prefix = f"{name}." if name else ""
        if any(name == s or name.startswith(s + ".") or not s for s in skip):
            continue
        if isinstance(module, SPLoRAMultiheadAttention):
            blocks.append(AttentionBlock(name, prefix + "q_proj", prefix + "k_proj", prefix + "v_proj",
                                         prefix + "out_proj", module.num_heads, module.num_heads, module.head_dim,
                                         False, True))
        elif not isinstance(module, SPLoRALinear):
            block = _hf_block(name, module, model, modules)
            if block is not None:
                blocks.append(block)
    return blocks


# --------------------------------------------------------------------------------------------------
# Running Hugging Face's attention core on the active heads only.


class ActiveHeads:
    """Hooks of one Hugging Face attention layer that drop pruned heads before its core.

    The active key/value heads are read from the projections' mask buffers (the one
    thing a task package stores) and rebuilt only when a buffer changes.
    """

    def __init__(self, block: AttentionBlock, v_proj: SPLoRALinear, out_proj: SPLoRALinear):
        self.block = block
        self.v_proj, self.out_proj = v_proj, out_proj
        self._versions: tuple | None = None
        self.kv_index: Tensor | None = None
        self.query_index: Tensor | None = None

    def _refresh(self) -> None:
        masks = (self.v_proj.out_mask, self.out_proj.in_mask)
        versions = tuple((id(mask), mask._version) for mask in masks)
        if versions == self._versions:
            return
        block = self.block
        rep = block.heads // block.kv_heads
        value_alive = self.v_proj.out_mask.view(block.kv_heads, block.head_dim).any(1)
        out_alive = self.out_proj.in_mask.view(block.kv_heads, rep * block.head_dim).any(1)
        alive = value_alive & out_alive
        if bool(alive.all()):  # one host sync per mask change
            self.kv_index = self.query_index = None
        else:
            # With every head pruned, head 0 still runs (its output is zero or unread):
            # the module's reshape with -1 heads cannot infer a count from no elements.
            self.kv_index = torch.nonzero(alive).flatten() if bool(alive.any()) else alive.new_zeros(1, dtype=torch.int64)
            self.query_index = (self.kv_index.unsqueeze(1) * rep + torch.arange(rep, device=alive.device)).flatten()
        self._versions = versions

    def _gather(self, output: Tensor, index: Tensor | None) -> Tensor | None:
        if index is None:
            return None
        heads = output.unflatten(-1, (-1, self.block.head_dim))
        return heads.index_select(-2, index).flatten(-2)

    # Inside torch.compile the hooks stand aside and the core runs every head: finding the
    # active heads reads the masks on the host, which a graph cannot do without breaking.
    # The result is the same (pruned heads are zero either way); only the saving is lost.

    def query_hook(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        if torch.compiler.is_compiling():
            return None
        self._refresh()
        return self._gather(output, self.query_index)

    def key_value_hook(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        if torch.compiler.is_compiling():
            return None
        self._refresh()
        return self._gather(output, self.kv_index)

    def out_pre_hook(self, module: nn.Module, inputs: tuple) -> tuple | None:
        if torch.compiler.is_compiling() or self.query_index is None:
            return None
        compact = inputs[0].unflatten(-1, (-1, self.block.head_dim))
        full = compact.new_zeros(*compact.shape[:-2], self.block.heads, self.block.head_dim)
        return (full.index_copy(-2, self.query_index, compact).flatten(-2), *inputs[1:])


def _installed(layer: nn.Module) -> ActiveHeads | None:
    for hook in layer._forward_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, ActiveHeads):
            return owner
    return None


def skip_pruned_heads(model: nn.Module) -> int:
    """Make every Hugging Face attention layer of ``model`` run its core on its active heads only.

    Idempotent (hooks already there are kept); the masks are read at each forward, so
    call it once, after converting or after loading a task into a fresh model.  Our
    :class:`~spa_kernels.nn.SPLoRAMultiheadAttention` needs no hook: it skips the heads
    of its ``head_mask`` itself.  Returns the number of layers hooked.
    """
    blocks = [block for block in attention_blocks(model) if not block.ours]
    for block in blocks:
        _hook(model, block)
    return len(blocks)


def _hook(model: nn.Module, block: AttentionBlock) -> None:
    q, k, v, out = (model.get_submodule(name) for name in (block.q, block.k, block.v, block.out))
    if _installed(q) is None:
        heads = ActiveHeads(block, v, out)
        q.register_forward_hook(heads.query_hook)
        k.register_forward_hook(heads.key_value_hook)
        v.register_forward_hook(heads.key_value_hook)
        out.register_forward_pre_hook(heads.out_pre_hook)


def activate_heads(model: nn.Module, block: AttentionBlock, head_mask: Tensor | None) -> None:
    """After a group of ``block`` changed its masks: let its attention core skip the pruned heads.

    ``head_mask`` (bool per head, from a whole-head group of our attention module)
    becomes its ``head_mask``; a Hugging Face layer gets the hooks of :func:`skip_pruned_heads`.
    """
    if block.ours:
        module = model.get_submodule(block.name)
        if head_mask is not None:
            module.set_masks(head_mask=head_mask.to(module.head_mask.device))
    else:
        _hook(model, block)


__all__ = ["ActiveHeads", "AttentionBlock", "activate_heads", "attention_blocks", "attention_projections",
           "skip_pruned_heads"]
