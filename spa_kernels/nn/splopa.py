"""``SPLoPALinear``: a frozen linear layer pruned in blocks, adapted by shared low-rank prototypes.

Parameter names, shapes and initialisation follow ``sp_adapters`` 0.7.1
(``SPLoPALinear``): ``weight``, ``bias``, ``adapter.prototypes.rows`` (K, r, q),
``adapter.prototypes.cols`` (K, p, r), ``adapter.pos_weights`` (K, out/p, in/q),
so state dicts move between the two libraries; this module adds only the
``block_mask`` buffer.

Sharing: sp_adapters shares prototypes (and, if asked, position weights)
through a process-wide table, so two models built in one process share them by
accident.  Here sharing is scoped by a :class:`SPLoPASharing` object: layers
built with the same one share, and :func:`spa_kernels.convert_splopa` makes one
per converted model.  A layer built without one owns its tensors.
"""

from __future__ import annotations

import math
import sys
import warnings

import torch
from torch import Tensor, nn

from .._block_validation import check_block_mask
from .._validation import check_scale
from ..backend import check_name
from ..functional import splopa_linear_trusted
from .adapter import check_init_range

DEFAULT_INIT_RANGE = 1e-4


def is_sp_adapters_splopa_linear(module: nn.Module) -> bool:
    sp_adapters = sys.modules.get("sp_adapters")  # never import it ourselves
    splopa = getattr(sp_adapters, "splopa", None) if sp_adapters is not None else None
    return splopa is not None and isinstance(module, splopa.SPLoPALinear)


def prototype_rank_of(prototype_rank: int | float, block_height: int) -> int:
    """sp_adapters' rule: an int, or a float below 1 meaning a fraction of the block height p."""
    if isinstance(prototype_rank, bool) or not isinstance(prototype_rank, (int, float)):
        raise TypeError(f"prototype_rank must be an int or a float fraction, got {type(prototype_rank).__name__}")
    rank = round(block_height * prototype_rank) if prototype_rank < 1 else round(prototype_rank)
    if rank < 1:
        raise ValueError(f"prototype_rank={prototype_rank} gives a rank of 0 for blocks of height {block_height}")
    return int(rank)


class BlockPrototypes(nn.Module):
    r"""K low-rank prototypes :math:`\Pi_k = U_k V_k` of shape p × q.

    Parameters: ``rows`` ``(K, r, q)`` = V, Kaiming-uniform (``a = √5``); ``cols``
    ``(K, p, r)`` = U, uniform in ``±init_range`` (Kaiming when ``None``/0), as sp_adapters.
    """

    def __init__(self, num_prototypes: int, block_shape: tuple[int, int], rank: int,
                 init_range: float | None, device=None, dtype=None) -> None:
        super().__init__()
        p, q = block_shape
        factory = {"device": device, "dtype": dtype}
        self.rows = nn.Parameter(torch.empty(num_prototypes, rank, q, **factory))
        self.cols = nn.Parameter(torch.empty(num_prototypes, p, rank, **factory))
        self.reset_parameters(init_range)

    def reset_parameters(self, init_range: float | None = None) -> None:
        nn.init.kaiming_uniform_(self.rows, a=math.sqrt(5))
        if init_range:
            nn.init.uniform_(self.cols, -init_range, init_range)
        else:
            nn.init.kaiming_uniform_(self.cols, a=math.sqrt(5))

    def extra_repr(self) -> str:
        k, p, r = self.cols.shape
        return f"num_prototypes={k}, block_shape=({p}, {self.rows.shape[2]}), rank={r}"


def _new_pos_weights(num_prototypes: int, block_rows: int, block_cols: int, device, dtype) -> nn.Parameter:
    pos_weights = nn.Parameter(torch.empty(num_prototypes, block_rows, block_cols, device=device, dtype=dtype))
    nn.init.kaiming_uniform_(pos_weights, a=math.sqrt(5))
    return pos_weights


class SPLoPASharing:
    """The scope within which SPLoPA layers share prototypes and position weights.

    Layers built with the same object share the prototypes of one
    ``(K, p, q, r)`` (and, with ``shared_pos_weights``, the position weights of
    one ``(K, out/p, in/q)``).  Converting layers that already share (sp_adapters
    layers from one model) keeps exactly the sharing they had.
    """

    def __init__(self) -> None:
        self._prototypes: dict[tuple, BlockPrototypes] = {}
        self._pos_weights: dict[tuple, nn.Parameter] = {}
        self._copies: dict[int, nn.Module | nn.Parameter] = {}
        self._sources: list[object] = []  # keeps the sources alive, so their ids stay theirs

    def prototypes(self, key: tuple, build) -> BlockPrototypes:
        if key not in self._prototypes:
            self._prototypes[key] = build()
        return self._prototypes[key]

    def pos_weights(self, key: tuple, build) -> nn.Parameter:
        if key not in self._pos_weights:
            self._pos_weights[key] = build()
        return self._pos_weights[key]

    def copy_of(self, source, build):
        """One copy per source object: sources shared by several layers stay shared."""
        if id(source) not in self._copies:
            self._copies[id(source)] = build()
            self._sources.append(source)
        return self._copies[id(source)]


class SPLoPAAdapter(nn.Module):
    """Holds ``prototypes`` (a :class:`BlockPrototypes`, possibly shared) and ``pos_weights`` (K, out/p, in/q)."""

    def __init__(self, prototypes: BlockPrototypes, pos_weights: nn.Parameter) -> None:
        super().__init__()
        self.prototypes = prototypes
        self.pos_weights = pos_weights


class SPLoPALinear(nn.Linear):
    r"""Block-pruned linear layer with a frozen weight and a prototype adapter (block-SPA, SPLoPA).

    .. math::
        y = x\,\big((W + s\,\Delta W) \odot (M \otimes 1_{p \times q})\big)^\top + b,
        \qquad \Delta W_{ij} = \sum_k \Phi_{k,i,j}\, U_k V_k

    Only active blocks of ``M`` (``block_mask``) are computed; the bias is on every output.

    Args:
        in_features, out_features, bias, device, dtype: as :class:`torch.nn.Linear`.
        num_prototypes, block_shape, prototype_rank, shared_prototypes,
        shared_pos_weights, init_range: as ``sp_adapters.SPLoPALinear``.  Sharing
            happens only between layers built with the same ``sharing``.
        scale: adapter scale ``s``.   backend: kernel backend (``None`` = auto).
        sharing: a :class:`SPLoPASharing`; ``None`` gives the layer tensors of its own.

    Parameters and buffers: ``weight`` (out, in), frozen; ``bias`` (out,);
    ``adapter.prototypes.rows`` (K, r, q); ``adapter.prototypes.cols`` (K, p, r);
    ``adapter.pos_weights`` (K, out/p, in/q); ``block_mask`` bool (out/p, in/q), all True initially.

    State dicts: one saved by sp_adapters loads with ``strict=True`` (no mask means
    all blocks active); one saved here loads into sp_adapters with ``strict=False``,
    whose only unexpected key is ``block_mask``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        num_prototypes: int = 64,
        block_shape: tuple[int, int] = (32, 32),
        prototype_rank: int | float = 1,
        shared_prototypes: bool = True,
        shared_pos_weights: bool = False,
        init_range: float | None = DEFAULT_INIT_RANGE,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        scale: float = 1.0,
        backend: str | None = None,
        sharing: SPLoPASharing | None = None,
    ) -> None:
        nn.Module.__init__(self)
        p, q = (int(v) for v in block_shape)
        if p < 1 or q < 1:
            raise ValueError(f"block_shape must be two positive ints, got {tuple(block_shape)}")
        if out_features % p != 0 or in_features % q != 0:
            raise ValueError(f"weight shape ({out_features}, {in_features}) is not divisible by "
                             f"block_shape ({p}, {q})")
        if isinstance(num_prototypes, bool) or not isinstance(num_prototypes, int) or num_prototypes < 1:
            raise ValueError(f"num_prototypes must be a positive int, got {num_prototypes!r}")
        rank = prototype_rank_of(prototype_rank, p)
        init_range = check_init_range(init_range)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.block_shape = (p, q)
        self.scale = check_scale(scale)
        self.backend = None if backend is None else check_name(backend)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        # sp_adapters' order (prototypes, position weights, then weight and bias), so
        # equal seeds give equal unshared layers in both libraries.
        def build_prototypes():
            return BlockPrototypes(num_prototypes, (p, q), rank, init_range, **factory)

        blocks = (out_features // p, in_features // q)

        def build_pos_weights():
            return _new_pos_weights(num_prototypes, *blocks, **factory)

        scope = sharing if sharing is not None else SPLoPASharing()
        prototypes = (scope.prototypes((num_prototypes, p, q, rank, device, dtype), build_prototypes)
                      if shared_prototypes else build_prototypes())
        pos_weights = (scope.pos_weights((num_prototypes, *blocks, device, dtype), build_pos_weights)
                       if shared_pos_weights else build_pos_weights())
        self.adapter = SPLoPAAdapter(prototypes, pos_weights)
        self.register_buffer("block_mask", torch.ones(blocks, dtype=torch.bool, device=self.weight.device))
        self._all_active = True
        nn.Linear.reset_parameters(self)

    @property
    def num_prototypes(self) -> int:
        return self.adapter.pos_weights.shape[0]

    @property
    def prototype_rank(self) -> int:
        return self.adapter.prototypes.rows.shape[1]

    def set_masks(self, block_mask: Tensor | None = None) -> None:
        """Set the bool ``(out/p, in/q)`` block mask; ``None`` makes every block active."""
        if block_mask is None:
            self.block_mask.fill_(True)
        else:
            check_block_mask(block_mask, "block_mask", *self.block_mask.shape)
            self.block_mask.copy_(block_mask)
        self._all_active = bool(self.block_mask.all())

    def refresh_indices(self) -> None:
        """Re-read ``block_mask`` after it was written in place (``set_masks`` does this itself)."""
        self._all_active = bool(self.block_mask.all())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # sp_adapters checkpoints have no mask: such a layer has every block active.
        absent = prefix + "block_mask" not in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if absent:
            if prefix + "block_mask" in missing_keys:
                missing_keys.remove(prefix + "block_mask")
            self.block_mask.fill_(True)
        if self.block_mask.dtype != torch.bool:
            self.block_mask = self.block_mask != 0
        self._all_active = bool(self.block_mask.all())

    def forward(self, input: Tensor) -> Tensor:
        prototypes = self.adapter.prototypes
        return splopa_linear_trusted(
            input, self.weight, prototypes.rows, prototypes.cols, self.adapter.pos_weights, self.bias,
            None if self._all_active else self.block_mask, self.scale, self.backend,
        )

    # ------------------------------------------------------------------ conversion

    @classmethod
    def from_module(
        cls,
        module: nn.Linear,
        num_prototypes: int = 64,
        block_shape: tuple[int, int] = (32, 32),
        prototype_rank: int | float = 1,
        shared_prototypes: bool = True,
        shared_pos_weights: bool = False,
        init_range: float | None = DEFAULT_INIT_RANGE,
        *,
        scale: float = 1.0,
        backend: str | None = None,
        sharing: SPLoPASharing | None = None,
    ) -> SPLoPALinear:
        """Wrap a layer: copy its weight (frozen) and bias, keep its device and dtype.

        ``module`` is an ``nn.Linear`` (gets a fresh adapter), or an
        ``sp_adapters.SPLoPALinear`` / ``SPLoPALinear`` whose adapter is copied
        (its K, block shape and rank win over the arguments; the mask is copied
        from an ``SPLoPALinear``).  With one ``sharing`` for a whole model,
        adapter tensors the sources share stay shared in the copies.
        """
        if not isinstance(module, nn.Linear):
            raise TypeError(f"module must be an nn.Linear or a SPLoPA linear layer, got {type(module).__name__}")
        if isinstance(module.weight, nn.parameter.UninitializedParameter):
            raise ValueError("module has uninitialised (lazy) parameters; run one forward pass first")
        sharing = sharing if sharing is not None else SPLoPASharing()
        factory = {"device": module.weight.device, "dtype": module.weight.dtype}
        source = module.adapter if isinstance(module, cls) or is_sp_adapters_splopa_linear(module) else None
        if source is not None:
            k, p, rank = source.prototypes.cols.shape
            num_prototypes, block_shape, prototype_rank = k, (p, source.prototypes.rows.shape[2]), rank
        layer = cls(
            module.in_features, module.out_features, module.bias is not None, num_prototypes, block_shape,
            prototype_rank, shared_prototypes, shared_pos_weights, init_range, scale=scale, backend=backend,
            sharing=sharing, **factory,
        )
        with torch.no_grad():
            layer.weight.copy_(module.weight)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
        if source is not None:
            layer.adapter.prototypes = sharing.copy_of(source.prototypes, lambda: _copied(source.prototypes, factory))
            layer.adapter.pos_weights = sharing.copy_of(
                source.pos_weights, lambda: nn.Parameter(source.pos_weights.detach().to(**factory, copy=True)))
        if isinstance(module, cls):
            layer.set_masks(module.block_mask)
        return layer.train(module.training)

    @torch.no_grad()
    def merged_blocks(self) -> tuple[Tensor, Tensor, Tensor]:
        """(block rows, block columns, blocks (active, p, q)) of ``W + s ΔW`` over the active blocks."""
        p, q = self.block_shape
        rows, cols = self.block_mask.nonzero(as_tuple=True)
        prototypes = self.adapter.prototypes
        pi = (prototypes.cols @ prototypes.rows).reshape(self.num_prototypes, p * q)
        delta = (self.adapter.pos_weights[:, rows, cols].t() @ pi).view(-1, p, q)
        weight = self.weight.view(self.out_features // p, p, self.in_features // q, q)[rows, :, cols, :]
        return rows, cols, weight + self.scale * delta

    @torch.no_grad()
    def compact(self, layout: str = "bsr") -> Tensor:
        """The merged masked weight ``(W + s ΔW) ⊙ (M ⊗ 1)``, as a BSR tensor of the active blocks or dense.

        ``layout="bsr"`` stores only the active blocks (``torch.sparse_bsr_tensor``
        with blocks ``(p, q)``); ``layout="dense"`` gives the ``(out, in)`` tensor.
        Either way ``y = x @ compact().T + bias`` (``torch.mm``/``addmm`` for BSR).
        """
        if layout not in ("bsr", "dense"):
            raise ValueError(f"layout must be 'bsr' or 'dense', got {layout!r}")
        rows, cols, blocks = self.merged_blocks()
        p, q = self.block_shape
        block_rows, block_cols = self.block_mask.shape
        if layout == "bsr":
            crow = torch.zeros(block_rows + 1, dtype=torch.int64, device=blocks.device)
            crow[1:] = torch.cumsum(self.block_mask.sum(1), 0)
            with warnings.catch_warnings():  # torch warns that BSR support is in beta
                warnings.simplefilter("ignore")
                return torch.sparse_bsr_tensor(crow, cols, blocks, size=(self.out_features, self.in_features),
                                               check_invariants=False)  # valid by construction
        dense = self.weight.new_zeros(block_rows, p, block_cols, q)
        dense[rows, :, cols, :] = blocks
        return dense.view(self.out_features, self.in_features)

    @torch.no_grad()
    def to_module(self) -> nn.Linear:
        """The merged full-size ``nn.Linear`` (pruned blocks zero, bias unchanged), equal to ``self`` in forward."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.compact("dense"))
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone())
        return linear.train(self.training)

    def extra_repr(self) -> str:
        active = int(self.block_mask.sum())
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"num_prototypes={self.num_prototypes}, block_shape={self.block_shape}, "
                f"prototype_rank={self.prototype_rank}, scale={self.scale}, "
                f"active_blocks={active}/{self.block_mask.numel()}")


def _copied(prototypes: nn.Module, factory: dict) -> BlockPrototypes:
    k, p, rank = prototypes.cols.shape
    copy = BlockPrototypes(k, (p, prototypes.rows.shape[2]), rank, None, **factory)
    with torch.no_grad():
        copy.rows.copy_(prototypes.rows)
        copy.cols.copy_(prototypes.cols)
    return copy
