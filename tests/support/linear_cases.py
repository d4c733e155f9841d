"""Cases, oracles and comparisons shared by the ``splora_linear`` tests.

The oracle is independent of spa_kernels on purpose: it builds the dense
effective weight ``W + s·B A`` in float64, zeroes the pruned rows and columns
with masks, computes ``y = x W_effᵀ + b ⊙ mask_out`` and lets torch.autograd
differentiate that formula.  Nothing in it shares code with the reference
backend, so a bug in the reference cannot hide in its own oracle.

Tolerances (docs/design.md section 6): float32 within 1e-4 of the largest float64
value, float64 within 1e-10 of it; bfloat16 / float16 at most twice the error
of PyTorch's own computation of the same formula in that dtype, plus a quarter
ulp of the largest value for results PyTorch happens to get exactly.  Every
comparison prints the largest error and where it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import pytest
import torch
from hypothesis import strategies as st
from torch import Tensor

import spa_kernels
from spa_kernels import backend as backend_policy

GRAD_NAMES = ("x", "weight", "lora_a", "lora_b", "bias")
LOW_PRECISION = (torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class LinearSpec:
    """Recipe of one case: shapes and options, no tensors.

    ``keep_in`` / ``keep_out``: ``None`` passes ``in_idx=None`` (all active); a
    float is a fraction of the channels (``1.0`` passes every index, ``0.0`` an
    empty index tensor); an int is an exact count of active channels.
    """

    lead: tuple[int, ...] = (7,)
    in_features: int = 13
    out_features: int = 31
    rank: int | None = 4  # None: no adapter (plain masked layer)
    keep_in: float | int | None = 0.5
    keep_out: float | int | None = 0.5
    bias: bool = True
    in_index_dtype: torch.dtype = torch.int64
    out_index_dtype: torch.dtype = torch.int64
    scale: float = 1.0
    noncontiguous: bool = False  # x, weight and adapters passed as strided views
    grads: tuple[str, ...] = ("x", "lora_a", "lora_b", "bias")  # add "weight" to unfreeze W
    expanded_grad: bool = False  # grad_out with stride 0, as from y.sum().backward()

    @property
    def requested_grads(self) -> tuple[str, ...]:
        present = {"x", "weight"}
        if self.rank is not None:
            present |= {"lora_a", "lora_b"}
        if self.bias:
            present.add("bias")
        return tuple(name for name in GRAD_NAMES if name in self.grads and name in present)

    @property
    def rows(self) -> int:
        rows = 1
        for size in self.lead:
            rows *= size
        return rows


def _active_count(keep: float | int, size: int) -> int:
    if isinstance(keep, int) and not isinstance(keep, bool):
        return keep
    if keep <= 0:
        return 0
    return min(size, max(1, round(keep * size)))


def _pick_indices(keep, size: int, dtype: torch.dtype, generator: torch.Generator) -> Tensor | None:
    if keep is None:
        return None
    count = _active_count(keep, size)
    chosen = torch.randperm(size, generator=generator)[:count]
    return chosen.sort().values.to(dtype)


@dataclasses.dataclass
class LinearCase:
    """Float64 master tensors of one case; every run casts from these."""

    spec: LinearSpec
    x: Tensor
    weight: Tensor
    lora_a: Tensor | None
    lora_b: Tensor | None
    bias: Tensor | None
    in_idx: Tensor | None
    out_idx: Tensor | None
    grad_out: Tensor

    @property
    def in_mask(self) -> Tensor:
        return _mask(self.in_idx, self.spec.in_features)

    @property
    def out_mask(self) -> Tensor:
        return _mask(self.out_idx, self.spec.out_features)

    def leaves(self, dtype: torch.dtype, *, via: torch.dtype | None = None) -> dict[str, Tensor | None]:
        """Fresh leaf tensors in ``dtype`` (rounded through ``via`` first when given)."""
        leaves = {}
        for name in GRAD_NAMES:
            master = getattr(self, name)
            if master is None:
                leaves[name] = None
                continue
            value = master.to(via).to(dtype) if via is not None else master.to(dtype)
            leaves[name] = value.detach().clone().requires_grad_(name in self.spec.requested_grads)
        return leaves

    def presented(self, leaves: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
        """The tensors handed to the op: strided views of the leaves when asked for."""
        if not self.spec.noncontiguous:
            return dict(leaves)
        views = {}
        for name, leaf in leaves.items():
            if leaf is None:
                views[name] = None
            elif leaf.dim() == 1:  # every other element of a twice-as-long buffer: stride 2
                views[name] = torch.stack((leaf, torch.zeros_like(leaf)), dim=-1)[..., 0]
            else:  # same values, transposed memory
                views[name] = leaf.transpose(0, -1).contiguous().transpose(0, -1)
        return views

    def grad_output(self, dtype: torch.dtype, *, via: torch.dtype | None = None) -> Tensor:
        value = self.grad_out.to(via).to(dtype) if via is not None else self.grad_out.to(dtype)
        if self.spec.expanded_grad:
            return value.reshape(-1)[:1].reshape([1] * value.dim()).expand(value.shape)
        return value


def _mask(idx: Tensor | None, size: int) -> Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    if idx is None:
        mask[:] = True
    else:
        mask[idx.long()] = True
    return mask


def build_case(spec: LinearSpec, seed: int = 0) -> LinearCase:
    """Random tensors for ``spec``.

    The adapter term is scaled to be as large as the base term, so an adapter
    bug cannot hide below the tolerance (a LoRA initialised with B = 0 would).
    """
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    n_in, n_out = spec.in_features, spec.out_features

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=f64)

    x = randn(*spec.lead, n_in)
    weight = randn(n_out, n_in) / max(n_in, 1) ** 0.5
    lora_a = lora_b = None
    if spec.rank is not None:
        lora_a = randn(spec.rank, n_in) / max(n_in, 1) ** 0.5
        lora_b = randn(n_out, spec.rank) / spec.rank**0.5
    bias = randn(n_out) if spec.bias else None
    in_idx = _pick_indices(spec.keep_in, n_in, spec.in_index_dtype, gen)
    out_idx = _pick_indices(spec.keep_out, n_out, spec.out_index_dtype, gen)
    grad_out = randn(*spec.lead, n_out)
    return LinearCase(spec, x, weight, lora_a, lora_b, bias, in_idx, out_idx, grad_out)


# Shapes that break kernels (docs/design.md section 6).  Every size here fits the
# Triton interpreter: at most 48 channels and 40 rows.
SMALL_SPECS = {
    "basic": LinearSpec(),
    "batch1-rank1-keepall-int32": LinearSpec(
        lead=(1,), in_features=37, out_features=13, rank=1, keep_in=1.0, keep_out=1.0,
        in_index_dtype=torch.int32, out_index_dtype=torch.int32,
    ),
    "nd-x": LinearSpec(lead=(2, 3), in_features=31, out_features=7, rank=8, keep_out=None),
    "rank-above-in": LinearSpec(lead=(5,), in_features=13, out_features=37, rank=40, scale=0.5),
    "keep-0.1": LinearSpec(lead=(11,), in_features=37, out_features=31, keep_in=0.1, keep_out=0.1),
    "all-pruned": LinearSpec(lead=(5,), in_features=7, out_features=13, keep_in=0.0, keep_out=0.0),
    "inputs-all-pruned": LinearSpec(lead=(5,), in_features=7, out_features=13, keep_in=0.0),
    "outputs-all-pruned": LinearSpec(lead=(5,), in_features=7, out_features=13, keep_out=0.0),
    "one-channel": LinearSpec(lead=(6,), in_features=29, out_features=23, keep_in=1, keep_out=1),
    "no-adapter": LinearSpec(rank=None, keep_in=0.5, keep_out=0.5),
    "no-bias": LinearSpec(bias=False, scale=-2.5),
    "plain-linear": LinearSpec(rank=None, bias=False, keep_in=None, keep_out=None),
    "no-indices": LinearSpec(lead=(3,), rank=3, keep_in=None, keep_out=None),
    "noncontiguous": LinearSpec(lead=(9,), in_features=19, out_features=17, noncontiguous=True, scale=-0.75),
    "noncontiguous-nd": LinearSpec(lead=(2, 5), in_features=11, out_features=9, noncontiguous=True, rank=2),
    "all-ones": LinearSpec(lead=(1,), in_features=1, out_features=1, rank=1, keep_in=None, keep_out=None),
    "vector-x": LinearSpec(lead=(), in_features=13, out_features=7, rank=2),
    "sizes-2-7": LinearSpec(lead=(40,), in_features=2, out_features=7, rank=2, keep_in=1, keep_out=0.5),
    "mixed-index-dtypes": LinearSpec(in_index_dtype=torch.int32, out_index_dtype=torch.int64, scale=0.3),
    "weight-grad": LinearSpec(lead=(8,), in_features=17, out_features=19, grads=GRAD_NAMES),
    "weight-grad-no-adapter": LinearSpec(rank=None, grads=("x", "weight", "bias")),
    "adapter-grads-only": LinearSpec(lead=(13,), grads=("lora_a", "lora_b", "bias")),
    "x-grad-only": LinearSpec(grads=("x",)),
    "forward-only": LinearSpec(grads=()),
    "scale-zero": LinearSpec(scale=0.0),
    "expanded-grad-out": LinearSpec(expanded_grad=True),
    "square-48": LinearSpec(lead=(40,), in_features=48, out_features=48, rank=16),
    # The cpu backend adds the adapter by the route that multiplies less
    # (csrc/cpu/masked_gemm.h): as r extra columns when rows are few, folded into
    # the packed weight panels when they are many (here with a ragged last block).
    "adapter-as-columns": LinearSpec(lead=(2,), in_features=40, out_features=44, rank=8, keep_in=0.75, keep_out=0.75),
    "adapter-folded": LinearSpec(lead=(40,), in_features=9, out_features=11, rank=8, keep_in=None, keep_out=None),
    "empty-batch": LinearSpec(lead=(0,), in_features=7, out_features=5, grads=GRAD_NAMES),
    "empty-batch-nd": LinearSpec(lead=(3, 0), in_features=7, out_features=5),
}

# Several blocks along M, K and N for blocked GEMMs (too slow for the interpreter).
BIG_SPECS = {
    "big-keep1.0": LinearSpec(lead=(300,), in_features=200, out_features=300, rank=16, keep_in=1.0, keep_out=1.0),
    "big-keep0.5-weight-grad": LinearSpec(
        lead=(300,), in_features=200, out_features=300, rank=16, grads=GRAD_NAMES
    ),
    # PyTorch's own low-precision result is one GEMM with a single rounding here,
    # so the 2x yardstick is tight enough to catch low-precision accumulation.
    "big-plain-masked": LinearSpec(lead=(300,), in_features=200, out_features=300, rank=None, bias=False),
    "big-keep0.1": LinearSpec(lead=(300,), in_features=200, out_features=300, rank=16, keep_in=0.1, keep_out=0.1),
    "big-primes-noncontiguous": LinearSpec(
        lead=(257,), in_features=130, out_features=97, rank=40, keep_out=None, noncontiguous=True
    ),
    "big-nd-rank1-int32": LinearSpec(
        lead=(3, 97), in_features=257, out_features=67, rank=1, keep_in=None,
        in_index_dtype=torch.int32, out_index_dtype=torch.int32,
    ),
    "big-wide-out-adapter-grads": LinearSpec(
        lead=(67,), in_features=97, out_features=257, rank=16, keep_in=0.9, grads=("lora_a", "lora_b")
    ),
}


@st.composite
def linear_specs(draw, *, max_features: int = 48, max_rows: int = 40) -> LinearSpec:
    """Random cases: shapes, keep ratios, rank, bias/adapter presence, layouts."""
    lead_ndim = draw(st.integers(0, 2), label="lead ndim")
    if lead_ndim == 0:
        lead = ()
    elif lead_ndim == 1:
        lead = (draw(st.integers(1, max_rows), label="rows"),)
    else:
        lead = (draw(st.integers(1, 4)), draw(st.integers(1, max_rows // 4)))
    keeps = st.one_of(st.none(), st.sampled_from([0.0, 1.0, 1]), st.floats(0.05, 1.0))
    rank = draw(st.one_of(st.none(), st.integers(1, 8), st.integers(9, max_features + 8)), label="rank")
    grads = draw(
        st.sampled_from([
            ("x", "lora_a", "lora_b", "bias"),
            ("x", "weight", "lora_a", "lora_b", "bias"),
            ("lora_a", "lora_b", "bias"),
            ("x",),
        ]),
        label="grads",
    )
    return LinearSpec(
        lead=lead,
        in_features=draw(st.integers(1, max_features), label="in"),
        out_features=draw(st.integers(1, max_features), label="out"),
        rank=rank,
        keep_in=draw(keeps, label="keep_in"),
        keep_out=draw(keeps, label="keep_out"),
        bias=draw(st.booleans(), label="bias"),
        in_index_dtype=draw(st.sampled_from([torch.int32, torch.int64]), label="in_idx dtype"),
        out_index_dtype=draw(st.sampled_from([torch.int32, torch.int64]), label="out_idx dtype"),
        scale=draw(st.sampled_from([1.0, 0.5, -1.25, 3.0]), label="scale"),
        noncontiguous=draw(st.booleans(), label="noncontiguous"),
        grads=grads,
    )


# --------------------------------------------------------------------------- running


@contextlib.contextmanager
def recording_backend_calls() -> Iterator[list[str]]:
    """Names of the backends the op layer looks up while the block runs.

    A kernel lookup is one entry; so is a backend's own autograd entry when the
    op layer takes it (it then runs forward and backward without another lookup).
    """
    calls: list[str] = []
    original = backend_policy.get
    original_autograd_kernel = backend_policy.Backend.autograd_kernel

    def get(name: str):
        calls.append(name)
        return original(name)

    def autograd_kernel(self, op: str):
        fn = original_autograd_kernel(self, op)
        if fn is not None:
            calls.append(self.name)
        return fn

    backend_policy.get = get
    backend_policy.Backend.autograd_kernel = autograd_kernel
    try:
        yield calls
    finally:
        backend_policy.get = original
        backend_policy.Backend.autograd_kernel = original_autograd_kernel


def expected_backend_calls(backend: str, op: str, backward: bool) -> list[str]:
    """What :func:`recording_backend_calls` records for one eager call of ``op`` on ``backend``.

    One lookup per direction; one for both where the backend carries the op's
    autograd itself (the cpu backend's, in C++).
    """
    native = backend_policy.get(backend).autograd_kernel(op) is not None
    return [backend] * (2 if backward and not native else 1)


def _forward_and_grads(y: Tensor, leaves, names, grad_out: Tensor, *, materialize: bool) -> dict:
    result: dict[str, Tensor | None] = {"y": y.detach()}
    wanted = [leaves[name] for name in names]
    if wanted:
        grads = torch.autograd.grad(
            y, wanted, grad_outputs=grad_out, allow_unused=True, materialize_grads=materialize
        )
        for name, grad in zip(names, grads, strict=True):
            result[name] = None if grad is None else grad.detach()
    return result


def run_api(case: LinearCase, dtype: torch.dtype, backend: str) -> dict[str, Tensor | None]:
    """Forward and requested gradients through the public API on ``backend``.

    Also checks output shape/dtype and that the forward and the backward op
    really ran on ``backend`` (a silent fall-back would make the test vacuous).
    """
    leaves = case.leaves(dtype)
    args = case.presented(leaves)
    names = case.spec.requested_grads
    with recording_backend_calls() as calls:
        y = spa_kernels.splora_linear(
            args["x"], args["weight"], args["lora_a"], args["lora_b"], args["bias"],
            case.in_idx, case.out_idx, scale=case.spec.scale, backend=backend,
        )
        result = _forward_and_grads(y, leaves, names, case.grad_output(dtype), materialize=False)
    assert y.dtype == dtype, f"output dtype {y.dtype}, expected {dtype}"
    assert tuple(y.shape) == (*case.spec.lead, case.spec.out_features), f"output shape {tuple(y.shape)}"
    if case.spec.rows > 0:
        expected_calls = expected_backend_calls(backend, "splora_linear", bool(names))
        assert calls == expected_calls, f"op layer ran backends {calls}, expected {expected_calls}"
    for name in names:
        grad = result[name]
        assert grad is not None, f"gradient of {name} is None although {name} requires grad"
        assert grad.dtype == dtype and grad.shape == leaves[name].shape, (
            f"gradient of {name}: {grad.dtype} {tuple(grad.shape)}, expected {dtype} {tuple(leaves[name].shape)}"
        )
    return result


def dense_oracle(case: LinearCase, rounded_to: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """Forward and gradients of the dense masked formula in float64.

    The inputs are first rounded to ``rounded_to`` so that a low-precision run
    is compared with the exact result of the very inputs it was given.
    """
    leaves = case.leaves(torch.float64, via=rounded_to)
    x, weight, lora_a, lora_b, bias = (leaves[name] for name in GRAD_NAMES)
    in_mask = case.in_mask.to(torch.float64)
    out_mask = case.out_mask.to(torch.float64)
    w_eff = weight
    if lora_a is not None:
        w_eff = w_eff + case.spec.scale * (lora_b @ lora_a)
    w_eff = w_eff * out_mask[:, None] * in_mask[None, :]
    y = torch.matmul(x, w_eff.t())
    if bias is not None:
        y = y + bias * out_mask
    grad_out = case.grad_output(torch.float64, via=rounded_to)
    return _forward_and_grads(y, leaves, case.spec.requested_grads, grad_out, materialize=True)


def torch_low_precision(case: LinearCase, dtype: torch.dtype) -> dict[str, Tensor]:
    """PyTorch's own computation of the active block in ``dtype`` (the error yardstick)."""
    leaves = case.leaves(dtype)
    x, weight, lora_a, lora_b, bias = (leaves[name] for name in GRAD_NAMES)
    n_in, n_out = case.spec.in_features, case.spec.out_features
    in_idx = torch.arange(n_in) if case.in_idx is None else case.in_idx.long()
    out_idx = torch.arange(n_out) if case.out_idx is None else case.out_idx.long()
    x_s = x.index_select(-1, in_idx)
    y_o = torch.matmul(x_s, weight.index_select(0, out_idx).index_select(1, in_idx).t())
    if lora_a is not None:
        t = torch.matmul(x_s, lora_a.index_select(1, in_idx).t())
        y_o = y_o + case.spec.scale * torch.matmul(t, lora_b.index_select(0, out_idx).t())
    if bias is not None:
        y_o = y_o + bias.index_select(0, out_idx)
    y = torch.zeros(*case.spec.lead, n_out, dtype=dtype).index_copy(-1, out_idx, y_o)
    return _forward_and_grads(y, leaves, case.spec.requested_grads, case.grad_output(dtype), materialize=True)


# --------------------------------------------------------------------------- comparing


def max_error_report(name: str, actual: Tensor, expected: Tensor) -> tuple[float, str]:
    """Largest absolute error of ``actual`` against ``expected`` and a line saying where."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return 0.0, f"{name}: empty"
    diff = (actual.to(torch.float64) - expected.to(torch.float64)).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    flat = int(diff.reshape(-1).argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    error = float(diff.reshape(-1)[flat])
    report = (
        f"{name}: max |error| {error:.3e} at {where} "
        f"(got {float(actual.reshape(-1)[flat]):.6g}, expected {float(expected.reshape(-1)[flat]):.6g}; "
        f"max |expected| {float(expected.abs().max()):.3e})"
    )
    return error, report


def assert_close_report(name: str, actual: Tensor, expected: Tensor, tolerance: float) -> None:
    error, report = max_error_report(name, actual, expected)
    print(f"{report}; tolerance {tolerance:.3e}")
    assert error <= tolerance, f"{report} exceeds tolerance {tolerance:.3e}"


def _largest(t: Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def check_only_asked(names: tuple[str, ...], output_mask, got, expected, tolerance: float = 1e-5) -> None:
    """A backward's gradients: ``None`` where ``output_mask`` did not ask, close to ``expected`` where it did."""
    for name, want, g, e in zip(names, output_mask, got, expected, strict=True):
        if not want:
            assert g is None, f"{name} gradient computed although not asked for"
            continue
        torch.testing.assert_close(g, e, rtol=tolerance, atol=tolerance, msg=lambda m, name=name: f"{name}: {m}")


def check_results(
    name: str,
    actual: dict[str, Tensor | None],
    expected: dict[str, Tensor],
    dtype: torch.dtype,
    yardstick: dict[str, Tensor] | None = None,
) -> None:
    """Compare every entry of ``actual`` with the float64 ``expected``.

    ``yardstick`` (bf16/fp16 only) is PyTorch's own low-precision result; the
    allowed error is twice its error plus a quarter ulp of the largest value.
    """
    assert set(actual) == set(expected), f"{name}: computed {sorted(actual)}, expected {sorted(expected)}"
    failures = []
    for key in expected:
        largest = _largest(expected[key])
        if dtype == torch.float64:
            tolerance = 1e-10 * largest
        elif dtype == torch.float32:
            tolerance = 1e-4 * largest
        else:
            assert yardstick is not None, "low-precision checks need PyTorch's own result"
            torch_error, torch_report = max_error_report(f"torch {dtype} {key}", yardstick[key], expected[key])
            print(torch_report)
            tolerance = 2 * torch_error + torch.finfo(dtype).eps / 4 * largest
        error, report = max_error_report(f"{name} {dtype} {key}", actual[key], expected[key])
        print(f"{report}; tolerance {tolerance:.3e}")
        if not error <= tolerance:
            failures.append(f"{report} exceeds tolerance {tolerance:.3e}")
    assert not failures, "\n".join(failures)


def assert_pruned_exact_zero(name: str, result: dict[str, Tensor | None], case: LinearCase) -> None:
    """Outputs and gradients are exactly zero at every pruned entry (docs/design.md section 1)."""
    in_pruned = ~case.in_mask
    out_pruned = ~case.out_mask
    pruned = {
        "y": (Ellipsis, out_pruned),
        "x": (Ellipsis, in_pruned),
        "lora_a": (slice(None), in_pruned),
        "lora_b": (out_pruned,),
        "bias": (out_pruned,),
    }
    failures = []
    for key, where in pruned.items():
        value = result.get(key)
        if value is None:
            continue
        selected = value[where]
        nonzero = int((selected != 0).sum())
        if nonzero:
            failures.append(f"{name}: {key} has {nonzero} non-zero pruned entries, largest {_largest(selected):.3e}")
    grad_w = result.get("weight")
    if grad_w is not None:
        outside = ~(case.out_mask[:, None] & case.in_mask[None, :])
        nonzero = int((grad_w[outside] != 0).sum())
        if nonzero:
            failures.append(f"{name}: weight gradient has {nonzero} non-zero entries outside the active block")
    for failure in failures:
        print(failure)
    assert not failures, "\n".join(failures)


def poison_pruned(case: LinearCase, value: float = float("nan")) -> LinearCase:
    """A copy of ``case`` whose pruned entries (inputs and grad_out) hold ``value``.

    ``y`` sums over active channels only, so nothing outside the active block
    may be read: the result must equal that of the clean case.
    """
    in_pruned, out_pruned = ~case.in_mask, ~case.out_mask
    x = case.x.clone()
    x[..., in_pruned] = value
    weight = case.weight.clone()
    weight[out_pruned] = value
    weight[:, in_pruned] = value
    lora_a = lora_b = bias = None
    if case.lora_a is not None:
        lora_a = case.lora_a.clone()
        lora_a[:, in_pruned] = value
        lora_b = case.lora_b.clone()
        lora_b[out_pruned] = value
    if case.bias is not None:
        bias = case.bias.clone()
        bias[out_pruned] = value
    grad_out = case.grad_out.clone()
    grad_out[..., out_pruned] = value
    return dataclasses.replace(case, x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, bias=bias, grad_out=grad_out)


# --------------------------------------------------------------------------- backends


# The "ISA" of a cpu param that runs the kernels' small-problem loops (csrc/cpu/small_problems.h)
# wherever a call is small enough; the per-ISA params run the GEMM engine always.
SMALL_PROBLEMS = "small-problems"


def non_reference_backend_params(*, with_isa: bool = True, with_small_problems: bool = False) -> list:
    """``pytest.param``s of every non-reference CPU backend, one per ISA for "cpu".

    ``with_small_problems`` adds a "cpu" param for the small-problem loops (the
    linear kernels have them).  An empty list becomes a single skipped param, so
    a machine with nothing built reports a skip with the reason rather than
    passing vacuously.
    """
    params = []
    for name in spa_kernels.backends("cpu"):
        if name == "reference":
            continue
        if name == "cpu" and with_isa:
            isas = spa_kernels.backend.cpu.supported_isas()
            for isa in isas:
                params.append(pytest.param((name, isa), id=f"cpu-{isa}"))
            if with_small_problems:
                params.append(pytest.param((name, SMALL_PROBLEMS), id=f"cpu-{SMALL_PROBLEMS}"))
            if not isas:  # built but reports no ISA: run once, test_cpu_isa_api fails
                params.append(pytest.param((name, None), id="cpu"))
        else:
            params.append(pytest.param((name, None), id=name))
    if not params:
        reason = (
            f"no non-reference backend on CPU: backends('cpu') == {spa_kernels.backends('cpu')} "
            "(build 'cpu' with `make build`; 'triton' needs Triton and TRITON_INTERPRET=1)"
        )
        params.append(pytest.param(None, marks=pytest.mark.skip(reason=reason), id="none-built"))
    return params


@contextlib.contextmanager
def forced_isa(isa: str | None) -> Iterator[None]:
    """Force the cpu backend's instruction set, on the GEMM engine for every call; restore both afterwards.

    ``SMALL_PROBLEMS`` keeps the instruction set and the small-problem loops on
    (their default limit); ``None`` changes nothing.
    """
    if isa is None:
        yield
        return
    cpu = spa_kernels.backend.cpu
    previous_isa, previous_limit = cpu.isa(), cpu.small_problem_limit()
    if isa == SMALL_PROBLEMS:
        assert previous_limit > 0, "the small-problem loops are off by default"
    else:
        cpu.set_isa(isa)
        cpu.set_small_problem_limit(0)
    try:
        assert isa == SMALL_PROBLEMS or cpu.isa() == isa, f"set_isa({isa!r}) left isa() == {cpu.isa()!r}"
        yield
    finally:
        cpu.set_isa(previous_isa)
        cpu.set_small_problem_limit(previous_limit)


def skip_unless_available(backend: str, dtype: torch.dtype) -> None:
    impl = backend_policy.get(backend)
    if not impl.is_available("cpu", dtype):
        pytest.skip(f"backend {backend!r} does not support {dtype} on CPU")
