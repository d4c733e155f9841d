"""The block suite: block-SPA (SPLoPA) linear against its anchors, forward and train step, per block density.

Shape: the standard linear (1576 × 768 → 3072), 32 × 32 blocks, K = 64
prototypes of rank 1, block densities from ``--keep`` (default 1.0, 0.5, 0.3, 0.1).

Contenders, all built from the same tensors and block mask:

* ``spa_kernels[<backend>]``: ``spa_kernels.splopa_linear``;
* ``dense masked``: ΔW by one einsum, ``(W + ΔW) ⊙ mask``, then ``F.linear``;
* ``sp_adapters``: ``sp_adapters.SPLoPALinear`` 0.7.1 (its ``(K, out, in)``
  Kronecker tensor), the mask applied to its adapted weight; skipped where that
  tensor and its gradient would not fit in the memory available;
* ``torch BSR``: the merged masked weight as ``to_sparse_bsr`` (merged before
  timing), then ``torch.addmm``; forward only (it has no adapter to train);
* ``dense GEMM × density``: ``F.linear`` of the unpruned weight (train step: with
  the gradients of x and W, three GEMMs) times the density: the limit.

Every contender is checked against a float64 evaluation of the formula (output
and every gradient) before it is timed.  Train step = forward + gradients of x,
the prototype factors, the position weights and the bias; W frozen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sp_adapters
import torch
import torch.nn.functional as F
from torch import Tensor

import spa_kernels

from . import Progress, RunConfig
from .anchors import ContenderMismatch, spa_kernels_name, tolerance
from .linear import timed_backends
from .report import SuiteReport, Table, TargetResult, format_ratio
from .shapes import DATA_SEED, VIT_B_MLP, format_keep
from .timing import Measurement, measure, measure_interleaved

BLOCK_SHAPE = (32, 32)
NUM_PROTOTYPES = 64
PROTOTYPE_RANK = 1
MODES = ("forward", "train step")
DENSE_MASKED = "dense masked"
SP_ADAPTERS = "sp_adapters"
TORCH_BSR = "torch BSR"
LIMIT = "dense GEMM × density"


@dataclass(frozen=True)
class Target:
    mode: str
    density: float
    numerator: str  # contender names; "spa" is the primary spa_kernels backend
    denominator: str
    limit: float


# CPU targets on the standard shape (fp32, 2 threads).  The last is the active-FLOP
# throughput against the best dense GEMM: (dense time × density) ÷ spa time.
CPU_TARGETS = (
    Target("forward", 0.5, DENSE_MASKED, "spa", 1.7),
    Target("forward", 0.1, DENSE_MASKED, "spa", 6.0),
    Target("train step", 0.5, DENSE_MASKED, "spa", 1.5),
    Target("train step", 0.1, DENSE_MASKED, "spa", 4.0),
    Target("forward", 0.5, LIMIT, "spa", 0.70),
)


@dataclass
class BlockProblem:
    x: Tensor
    weight: Tensor
    rows: Tensor  # (K, r, q)
    cols: Tensor  # (K, p, r)
    pos_weights: Tensor  # (K, out/p, in/q)
    bias: Tensor
    block_mask: Tensor
    grad_out: Tensor
    density: float

    @classmethod
    def make(cls, density: float, device: torch.device, dtype: torch.dtype) -> BlockProblem:
        shape = VIT_B_MLP
        generator = torch.Generator().manual_seed(DATA_SEED)
        p, q = BLOCK_SHAPE
        blocks = (shape.out_features // p, shape.in_features // q)

        def draw(*size: int, std: float) -> Tensor:
            return (torch.randn(*size, generator=generator) * std).to(device=device, dtype=dtype)

        order = torch.randperm(blocks[0] * blocks[1], generator=generator)
        mask = torch.zeros(blocks[0] * blocks[1], dtype=torch.bool)
        mask[order[: round(density * mask.numel())]] = True
        return cls(
            x=draw(shape.tokens, shape.in_features, std=1.0),
            weight=draw(shape.out_features, shape.in_features, std=shape.in_features ** -0.5),
            rows=draw(NUM_PROTOTYPES, PROTOTYPE_RANK, q, std=q ** -0.5),
            cols=draw(NUM_PROTOTYPES, p, PROTOTYPE_RANK, std=0.05),
            pos_weights=draw(NUM_PROTOTYPES, *blocks, std=0.1),
            bias=draw(shape.out_features, std=0.1),
            block_mask=mask.view(blocks).to(device),
            grad_out=draw(shape.tokens, shape.out_features, std=1.0),
            density=density,
        )

    def dense_mask(self) -> Tensor:
        return torch.kron(self.block_mask.to(self.x.dtype), torch.ones(BLOCK_SHAPE, device=self.x.device,
                                                                       dtype=self.x.dtype))


@dataclass
class Contender:
    name: str
    forward: Callable[[], Tensor]
    train_step: Callable[[], tuple[Tensor, ...]] | None  # x, rows, cols, pos_weights, bias gradients


def _leaf(t: Tensor) -> Tensor:
    return t.detach().clone().requires_grad_(True)


def _contender(name: str, layer: Callable[..., Tensor], problem: BlockProblem, trainable: bool = True,
               leaves: list[Tensor] | None = None) -> Contender:
    if leaves is None:
        leaves = [_leaf(t) for t in (problem.x, problem.rows, problem.cols, problem.pos_weights, problem.bias)]

    def forward() -> Tensor:
        with torch.no_grad():
            return layer(*leaves)

    def train_step() -> tuple[Tensor, ...]:
        return torch.autograd.grad(layer(*leaves), leaves, problem.grad_out)

    return Contender(name, forward, train_step if trainable else None)


def _dense_delta(rows: Tensor, cols: Tensor, pos_weights: Tensor) -> Tensor:
    """ΔW (out, in) by one einsum over the prototypes Π = U V."""
    k, i, j = pos_weights.shape
    p, q = cols.shape[1], rows.shape[2]
    return torch.einsum("kij,kpr,krq->ipjq", pos_weights, cols, rows).reshape(i * p, j * q)


def spa_contender(problem: BlockProblem, backend: str) -> Contender:
    weight, mask = problem.weight, problem.block_mask

    def layer(x, rows, cols, pos_weights, bias):
        return spa_kernels.splopa_linear(x, weight, rows, cols, pos_weights, bias, mask, backend=backend)

    return _contender(spa_kernels_name(backend), layer, problem)


def dense_masked_contender(problem: BlockProblem) -> Contender:
    weight, dense_mask = problem.weight, problem.dense_mask()

    def layer(x, rows, cols, pos_weights, bias):
        return F.linear(x, (weight + _dense_delta(rows, cols, pos_weights)) * dense_mask, bias)

    return _contender(DENSE_MASKED, layer, problem)


def sp_adapters_contender(problem: BlockProblem) -> Contender:
    """``sp_adapters.SPLoPALinear`` (its ``(K, out, in)`` Kronecker tensor), the mask applied to its adapted weight."""
    out_features, in_features = problem.weight.shape
    module = sp_adapters.SPLoPALinear(in_features, out_features, num_prototypes=NUM_PROTOTYPES,
                                      block_shape=BLOCK_SHAPE, prototype_rank=PROTOTYPE_RANK,
                                      shared_prototypes=False).to(device=problem.x.device, dtype=problem.x.dtype)
    adapter = module.adapter
    with torch.no_grad():
        module.weight.copy_(problem.weight)
        module.bias.copy_(problem.bias)
        adapter.prototypes.rows.copy_(problem.rows)
        adapter.prototypes.cols.copy_(problem.cols)
        adapter.pos_weights.copy_(problem.pos_weights)
    module.bias.requires_grad_(True)
    dense_mask = problem.dense_mask()

    def layer(x, rows, cols, pos_weights, bias):
        return F.linear(x, module.adapted_weight * dense_mask, module.bias)

    leaves = [_leaf(problem.x), adapter.prototypes.rows, adapter.prototypes.cols, adapter.pos_weights, module.bias]
    return _contender(SP_ADAPTERS, layer, problem, leaves=leaves)


def bsr_contender(problem: BlockProblem) -> Contender:
    merged = (problem.weight + _dense_delta(problem.rows, problem.cols, problem.pos_weights)) * problem.dense_mask()
    bsr = merged.to_sparse_bsr(BLOCK_SHAPE)
    bias = problem.bias

    def layer(x, rows, cols, pos_weights, b):
        return torch.addmm(bias.unsqueeze(1), bsr, x.t()).t()

    return _contender(TORCH_BSR, layer, problem, trainable=False)


def expected_result(problem: BlockProblem) -> list[Tensor]:
    """y and the five gradients in float64, from the dense formula."""
    leaves = [t.detach().double().requires_grad_(True)
              for t in (problem.x, problem.rows, problem.cols, problem.pos_weights, problem.bias)]
    x, rows, cols, pos_weights, bias = leaves
    weight = problem.weight.double() + _dense_delta(rows, cols, pos_weights)
    y = F.linear(x, weight * problem.dense_mask().double(), bias)
    return [y.detach(), *torch.autograd.grad(y, leaves, problem.grad_out.double())]


def check_contender(contender: Contender, expected: list[Tensor], dtype: torch.dtype, density: float) -> None:
    got = [contender.forward()]
    names = ["y"]
    if contender.train_step is not None:
        got += list(contender.train_step())
        names += ["dx", "d prototype_rows", "d prototype_cols", "d pos_weights", "dbias"]
    for name, g, w in zip(names, got, expected, strict=False):
        scale = w.abs().max().item()
        error = (g.double() - w).abs().max().item()
        if not error <= tolerance(dtype) * max(scale, 1e-30):
            raise ContenderMismatch(f"{contender.name} (density {density}): {name} differs from float64 by "
                                    f"{error:.3g} (largest {scale:.3g})")


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _sp_adapters_fits(problem: BlockProblem) -> tuple[bool, str]:
    # Its (K, out, in) tensor, the product inside bkron and the gradient of both.
    need = 4 * NUM_PROTOTYPES * problem.weight.numel() * problem.x.element_size()
    if problem.x.device.type != "cpu":
        free, _ = torch.cuda.mem_get_info(problem.x.device)
    else:
        free = _available_bytes()
    if free is None or need < 0.8 * free:
        return True, ""
    return False, f"sp_adapters skipped: its (K, out, in) tensors need ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"


def _dense_limit(problem: BlockProblem, device: torch.device, budget) -> dict[str, Measurement]:
    """The unpruned layer's GEMMs: forward F.linear; train step with dx and dW (three GEMMs)."""
    x, weight, bias = _leaf(problem.x), _leaf(problem.weight), _leaf(problem.bias)

    def forward():
        with torch.no_grad():
            return F.linear(x, weight, bias)

    def train_step():
        return torch.autograd.grad(F.linear(x, weight, bias), (x, weight, bias), problem.grad_out)

    return {"forward": measure(forward, device, budget), "train step": measure(train_step, device, budget)}


class BlockSuite:
    name = "block"

    def count_cases(self, config: RunConfig) -> int:
        return 1 + len(config.keeps) * (1 + len(MODES))

    def run(self, config: RunConfig, progress: Progress) -> SuiteReport:
        backends = [name for name in timed_backends(config.device) if name != "reference"]
        backends = [name for name in backends if spa_kernels.backend.get(name).implements("splopa_linear")]
        primary = spa_kernels_name(backends[0] if backends else "reference")
        notes = [f"{VIT_B_MLP.tokens} × {VIT_B_MLP.in_features} → {VIT_B_MLP.out_features}, blocks {BLOCK_SHAPE}, "
                 f"K = {NUM_PROTOTYPES}, r_p = {PROTOTYPE_RANK}; density = fraction of blocks kept.",
                 f"spa = {primary}; {LIMIT} = unpruned F.linear time × density (train step: with dx and dW).",
                 f"{TORCH_BSR}: merged masked weight converted before timing, forward only."]
        report = SuiteReport(self.name, notes=notes)
        progress.begin("block: dense GEMM limit")
        dense = _dense_limit(BlockProblem.make(1.0, config.device, config.dtype), config.device, config.budget)
        progress.end()
        results: dict[str, dict[float, dict[str, float]]] = {mode: {} for mode in MODES}
        tables: dict[str, dict[float, dict[str, Measurement]]] = {mode: {} for mode in MODES}
        for density in config.keeps:
            label = f"block density {format_keep(density)}"
            progress.begin(f"{label}: checking every contender")
            problem = BlockProblem.make(density, config.device, config.dtype)
            expected = expected_result(problem)
            contenders = [spa_contender(problem, name) for name in (backends or ["reference"])]
            contenders.append(dense_masked_contender(problem))
            fits, why = _sp_adapters_fits(problem)
            if fits:
                contenders.append(sp_adapters_contender(problem))
            elif why not in report.notes:
                report.notes.append(why)
            try:
                bsr = bsr_contender(problem)
                bsr.forward()
                contenders.append(bsr)
            except (RuntimeError, NotImplementedError) as error:
                report.notes.append(f"{TORCH_BSR} unavailable here at density {density}: {error}")
            for contender in contenders:
                check_contender(contender, expected, config.dtype, density)
            del expected
            progress.end()
            for mode in MODES:
                progress.begin(f"{label}: {mode}")
                fns = {c.name: c.forward if mode == "forward" else c.train_step for c in contenders
                       if mode == "forward" or c.train_step is not None}
                times = measure_interleaved(fns, config.device, config.budget)
                tables[mode][density] = times
                results[mode][density] = {name: m.median_ms for name, m in times.items()}
                results[mode][density][LIMIT] = dense[mode].median_ms * density
                progress.end()
        for mode in MODES:
            report.tables.append(self._table(mode, tables[mode], results[mode], primary, config))
        if config.device.type == "cpu":
            report.targets += self._targets(results, primary)
        return report

    @staticmethod
    def _table(mode, times_by_density, medians, primary, config) -> Table:
        names: list[str] = []
        for times in times_by_density.values():
            names += [name for name in times if name not in names]
        headers = ["density", *names, LIMIT, "dense masked ÷ spa", "limit ÷ spa"]
        rows = []
        for density, times in sorted(times_by_density.items(), reverse=True):
            spa = medians[density].get(primary)
            cells = [format_keep(density), *(str(times[n]) if n in times else "—" for n in names)]
            cells.append(f"{medians[density][LIMIT]:.3g}")
            for other in (DENSE_MASKED, LIMIT):
                value = medians[density].get(other)
                cells.append("—" if value is None or not spa else format_ratio(value / spa))
            rows.append(cells)
        dtype = str(config.dtype).removeprefix("torch.")
        return Table(f"block {VIT_B_MLP.name} ({dtype}) — {mode}: median ms (p20–p80)", headers, rows)

    @staticmethod
    def _targets(results, primary) -> list[TargetResult]:
        evaluated = []
        for target in CPU_TARGETS:
            medians = results[target.mode].get(target.density)
            value = None
            if medians is not None:
                numerator = medians.get(primary if target.numerator == "spa" else target.numerator)
                denominator = medians.get(primary if target.denominator == "spa" else target.denominator)
                if numerator and denominator:
                    value = numerator / denominator
            ratio = f"{target.numerator} ÷ {primary}"
            evaluated.append(TargetResult(target.mode, target.density, ratio, "≥", target.limit, value))
        return evaluated


SUITE = BlockSuite()

__all__ = ["SUITE", "BlockProblem", "expected_result"]
