"""The low-rank adapter held by SPLoRA modules: ``A`` as ``rows``, ``B`` as ``cols``.

Shapes and initialisation follow ``sp_adapters`` 0.7.1 (``LowRankMatrix`` with one
filter), so state-dict keys (``adapter.rows``, ``adapter.cols``) and values under
equal seeds match that library.  The leading dimension of 1 exists only for that
compatibility; kernels receive the 2-D views ``rows[0]`` and ``cols[0]``.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from .channel_masked import held_tensor


def check_init_range(init_range: object) -> float | None:
    """``None``/``0`` (Kaiming-initialised ``B``, as in sp_adapters) or a positive bound."""
    if init_range is None:
        return None
    if isinstance(init_range, bool) or not isinstance(init_range, numbers.Real):
        raise TypeError(f"init_range must be a real number or None, got {type(init_range).__name__}")
    init_range = float(init_range)
    if not math.isfinite(init_range) or init_range < 0:
        raise ValueError(f"init_range must be finite and >= 0, got {init_range}")
    return init_range


class LowRankAdapter(nn.Module):
    r"""Rank-``r`` adapter ``s·B A`` of a ``(out, in)`` weight.

    Parameters:
        rows: ``(1, r, in)``, the matrix ``A``; Kaiming-uniform (``a = √5``) over the
            3-D tensor, exactly as sp_adapters does (its fan-in is ``r·in``).
        cols: ``(1, out, r)``, the matrix ``B``; uniform in ``±init_range`` so the
            adapted layer starts close to the base layer (Kaiming-uniform when
            ``init_range`` is ``None`` or 0, as in sp_adapters).

    The dense product ``B A`` is never formed here: the kernels consume the factors.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        init_range: float | None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.init_range = check_init_range(init_range)
        self.rows = nn.Parameter(torch.empty(1, rank, in_features, **factory))
        self.cols = nn.Parameter(torch.empty(1, out_features, rank, **factory))

    @property
    def rank(self) -> int:
        return self.rows.shape[1]

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(A, B)`` for the op layer: ``rows`` and ``cols`` as held, ``(1, r, in)`` and ``(1, out, r)``.

        Not ``rows[0]``: a view per call would add an autograd node per factor to
        every training step, which the op layer does without.
        """
        params = self._parameters
        rows, cols = params.get("rows"), params.get("cols")
        if rows is None or cols is None:  # held elsewhere (a parametrization): the ordinary lookup
            return held_tensor(self, "rows"), held_tensor(self, "cols")
        return rows, cols

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.rows, a=math.sqrt(5))
        if self.init_range:
            nn.init.uniform_(self.cols, -self.init_range, self.init_range)
        else:
            nn.init.kaiming_uniform_(self.cols, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return f"in_features={self.rows.shape[2]}, out_features={self.cols.shape[1]}, rank={self.rank}"
