"""Cases, the float64 oracle and comparisons shared by the ``splopa_linear`` tests.

The oracle is independent of spa_kernels: it builds the dense adapter
``ΔW = Σ_k kron(Φ_k, U_k V_k)`` and the dense mask ``kron(M, 1_{p×q})`` in
float64, computes ``y = x ((W + s ΔW) ⊙ mask)ᵀ + b`` and lets torch.autograd
differentiate it.  It shares no code with the reference backend.

NaN is planted in the pruned blocks of ``weight`` and ``pos_weights`` passed to
the op (the oracle sees zeros there): a backend that reads a pruned block fails.
Tolerances are those of ``linear_cases.check_results``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import strategies as st
from torch import Tensor

import spa_kernels
from support.linear_cases import check_results, non_reference_backend_params

GRAD_NAMES = ("x", "weight", "prototype_rows", "prototype_cols", "pos_weights", "bias")
OPERAND_NAMES = ("x", "weight", "prototype_rows", "prototype_cols", "pos_weights", "bias")


@dataclasses.dataclass(frozen=True)
class SPLoPASpec:
    """Shapes and options of one case.  ``density``: None passes ``block_mask=None``; else the fraction of blocks kept."""

    lead: tuple[int, ...] = (7,)
    block_rows: int = 3
    block_cols: int = 4
    block_shape: tuple[int, int] = (5, 3)
    num_prototypes: int = 3
    rank: int = 2
    density: float | None = 0.5
    bias: bool = True
    scale: float = 0.7
    noncontiguous: bool = False
    grads: tuple[str, ...] = GRAD_NAMES

    @property
    def out_features(self) -> int:
        return self.block_rows * self.block_shape[0]

    @property
    def in_features(self) -> int:
        return self.block_cols * self.block_shape[1]


@dataclasses.dataclass
class SPLoPACase:
    spec: SPLoPASpec
    values: dict[str, Tensor | None]  # float64, pruned blocks zero
    block_mask: Tensor | None

    @property
    def dense_mask(self) -> Tensor:
        mask = self.block_mask
        if mask is None:
            mask = torch.ones(self.spec.block_rows, self.spec.block_cols, dtype=torch.bool)
        return mask

    def leaves(self, dtype: torch.dtype, *, plant_nan: bool = True, device: str = "cpu") -> dict[str, Tensor | None]:
        """Fresh leaf tensors in ``dtype`` on ``device``, NaN at pruned blocks of weight and pos_weights, grads as
        the spec asks."""
        pruned = ~self.dense_mask
        leaves = {}
        for name, value in self.values.items():
            if value is None:
                leaves[name] = None
                continue
            t = value.to(device=device, dtype=dtype).clone()
            if plant_nan and name == "pos_weights":
                t[:, pruned] = float("nan")
            if plant_nan and name == "weight":
                p, q = self.spec.block_shape
                t.view(self.spec.block_rows, p, self.spec.block_cols, q).permute(0, 2, 1, 3)[pruned] = float("nan")
            leaves[name] = t.requires_grad_(name in self.spec.grads)
        return leaves

    def presented(self, leaves: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
        """The operands as passed to the op: strided views when the spec asks for non-contiguous inputs."""
        if not self.spec.noncontiguous:
            return leaves
        return {name: None if t is None else t.transpose(-1, -2).contiguous().transpose(-1, -2)
                if t.dim() >= 2 else t for name, t in leaves.items()}


def random_specs(*, lead: int, blocks: int, block_side: int, prototypes: int, rank: int, min_lead_dims: int = 1,
                 scale: st.SearchStrategy[float] | None = None) -> st.SearchStrategy[SPLoPASpec]:
    """Cases of up to two leading dimensions of at most ``lead``, at most ``blocks`` block rows and columns
    of blocks at most ``block_side`` a side, at most ``prototypes`` prototypes of rank at most ``rank``, an
    unmasked or randomly masked grid, and ``scale`` drawn from the strategy given (else the default)."""
    options = {"scale": scale} if scale is not None else {}
    return st.builds(
        SPLoPASpec,
        lead=st.lists(st.integers(1, lead), min_size=min_lead_dims, max_size=2).map(tuple),
        block_rows=st.integers(1, blocks),
        block_cols=st.integers(1, blocks),
        block_shape=st.tuples(st.integers(1, block_side), st.integers(1, block_side)),
        num_prototypes=st.integers(1, prototypes),
        rank=st.integers(1, rank),
        density=st.one_of(st.none(), st.floats(0.0, 1.0)),
        **options,
    )


def build_case(spec: SPLoPASpec, seed: int = 0) -> SPLoPACase:
    generator = torch.Generator().manual_seed(seed)
    p, q = spec.block_shape

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    values = {
        "x": randn(*spec.lead, spec.in_features),
        "weight": randn(spec.out_features, spec.in_features),
        "prototype_rows": randn(spec.num_prototypes, spec.rank, q),
        "prototype_cols": randn(spec.num_prototypes, p, spec.rank),
        "pos_weights": randn(spec.num_prototypes, spec.block_rows, spec.block_cols),
        "bias": randn(spec.out_features) if spec.bias else None,
    }
    block_mask = None
    if spec.density is not None:
        count = round(spec.density * spec.block_rows * spec.block_cols)
        order = torch.randperm(spec.block_rows * spec.block_cols, generator=generator)
        block_mask = torch.zeros(spec.block_rows * spec.block_cols, dtype=torch.bool)
        block_mask[order[:count]] = True
        block_mask = block_mask.view(spec.block_rows, spec.block_cols)
    case = SPLoPACase(spec, values, block_mask)
    pruned = ~case.dense_mask
    values["pos_weights"][:, pruned] = 0
    values["weight"].view(spec.block_rows, p, spec.block_cols, q).permute(0, 2, 1, 3)[pruned] = 0
    return case


def oracle_forward(x, weight, rows, cols, pos_weights, bias, block_mask, scale, block_shape) -> Tensor:
    """y = x ((W + s Σ_k kron(Φ_k, U_k V_k)) ⊙ kron(M, 1))ᵀ + b, densely."""
    p, q = block_shape
    delta = sum(torch.kron(pos_weights[k].contiguous(), (cols[k] @ rows[k]).contiguous()) for k in range(pos_weights.shape[0]))
    dense_mask = torch.kron(block_mask.to(weight.dtype), torch.ones(p, q, dtype=weight.dtype))
    y = x @ ((weight + scale * delta) * dense_mask).t()
    return y if bias is None else y + bias


def run(case: SPLoPACase, dtype: torch.dtype, backend: str | None, *, oracle: bool = False, plant_nan: bool = True,
        grad_out: Tensor | None = None, device: str = "cpu") -> dict[str, Tensor | None]:
    """Output ``y`` and the gradients the spec asks for, from the op or (``oracle``) the dense formula.

    The op runs on ``device``; the results come back on the CPU.
    """
    leaves = case.leaves(dtype, plant_nan=plant_nan and not oracle, device=device)
    args = case.presented(leaves)
    operands = [args[name] for name in OPERAND_NAMES]
    if oracle:
        y = oracle_forward(*operands[:6], case.dense_mask, case.spec.scale, case.spec.block_shape)
    else:
        block_mask = None if case.block_mask is None else case.block_mask.to(device)
        y = spa_kernels.splopa_linear(*operands, block_mask, scale=case.spec.scale, backend=backend)
    result = {"y": y.detach()}
    wanted = [name for name in case.spec.grads if leaves[name] is not None]
    if wanted:
        if grad_out is None:
            grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        grads = torch.autograd.grad(y, [leaves[n] for n in wanted], grad_out.to(device=device, dtype=dtype))
        result.update(zip(wanted, grads, strict=True))
    return {key: value.cpu() for key, value in result.items()}


def check_against_oracle(name: str, case: SPLoPACase, dtype: torch.dtype, backend: str | None,
                         device: str = "cpu") -> None:
    expected = run(case, torch.float64, None, oracle=True)
    actual = run(case, dtype, backend, device=device)
    yardstick = run(case, dtype, None, oracle=True) if dtype in (torch.bfloat16, torch.float16) else None
    check_results(name, {k: v.double() for k, v in actual.items()}, expected, dtype,
                  None if yardstick is None else {k: v.double() for k, v in yardstick.items()})
    assert_pruned_exact_zero(name, actual, case)


def assert_pruned_exact_zero(name: str, result: dict[str, Tensor | None], case: SPLoPACase) -> None:
    """Gradients of weight and pos_weights are exactly zero at pruned blocks (never NaN)."""
    pruned = ~case.dense_mask
    p, q = case.spec.block_shape
    failures = []
    if result.get("pos_weights") is not None:
        selected = result["pos_weights"][:, pruned]
        if int((selected != 0).sum()) or selected.isnan().any():
            failures.append(f"{name}: pos_weights gradient non-zero at pruned blocks")
    if result.get("weight") is not None:
        blocks = result["weight"].reshape(case.spec.block_rows, p, case.spec.block_cols, q).permute(0, 2, 1, 3)
        selected = blocks[pruned]
        if int((selected != 0).sum()) or selected.isnan().any():
            failures.append(f"{name}: weight gradient non-zero at pruned blocks")
    for key, value in result.items():
        if value is not None and value.isnan().any():
            failures.append(f"{name}: {key} has NaN (a pruned block was read)")
    assert not failures, "\n".join(failures)


def implements_splopa(name: str) -> bool:
    return spa_kernels.backend.get(name).implements("splopa_linear")


def splopa_backends() -> list[str]:
    """The backends usable on the CPU that implement ``splopa_linear``."""
    return [name for name in spa_kernels.backends("cpu") if implements_splopa(name)]


def non_reference_splopa_params(*, exclude: tuple[str, ...] = ()) -> list:
    """``non_reference_backend_params`` less the backends named in ``exclude``.

    Every backend listed implements ``splopa_linear``; one that stops doing so
    fails its tests rather than being skipped.  Nothing left is one skipped
    param that says why, never a silent pass.
    """
    params = [param for param in non_reference_backend_params()
              if not (param.values and param.values[0] and param.values[0][0] in exclude)]
    if not params:
        reason = f"no non-reference CPU backend other than {exclude} runs here"
        params.append(pytest.param(None, marks=pytest.mark.skip(reason=reason), id="none-built"))
    return params
