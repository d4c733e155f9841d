"""Cases, oracles and comparisons shared by the SPLoRA / SPPaRA convolution tests.

The oracle is independent of spa_kernels on purpose: it builds the dense
effective weight in float64 (``W`` plus ``s·B A`` or ``P`` at the centre tap),
zeroes every entry whose output channel or input channel is pruned with a mask,
runs ``torch.nn.functional.conv{d}d`` with the padding exactly as the caller
wrote it (``"same"`` included) and lets torch.autograd differentiate.  The
reference backend instead gathers the active block, resolves padding itself and
has an explicit backward, so a bug in one cannot hide in the other.

Tolerances and reports come from ``support.linear_cases`` (docs/design.md section 6):
float32 within 1e-4 of the largest float64 value, float64 within 1e-10,
bfloat16 / float16 at most twice PyTorch's own error in that dtype.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor

import spa_kernels
from spa_kernels import backend as backend_policy
from support.linear_cases import (
    SMALL_PROBLEMS,
    _forward_and_grads,
    _pick_indices,
    expected_backend_calls,
    recording_backend_calls,
)

SPLORA_NAMES = ("x", "weight", "lora_a", "lora_b", "bias")
SPPARA_NAMES = ("x", "weight", "adapter", "bias")
TENSOR_NAMES = ("x", "weight", "lora_a", "lora_b", "adapter", "bias")
DEFAULT_GRADS = ("x", "lora_a", "lora_b", "adapter", "bias")  # W frozen
ALL_GRADS = ("x", "weight", "lora_a", "lora_b", "adapter", "bias")
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# --------------------------------------------------------------------------- cases


def _as_tuple(value, d: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * d


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """Recipe of one convolution case: shapes and options, no tensors.

    ``keep_in`` / ``keep_out`` as in ``LinearSpec``: ``None`` passes no index
    list, a float is a fraction of the channels, an int an exact count.
    ``padding`` is passed to the API as written (int, tuple, "same", "valid").
    """

    kind: str = "splora"  # "splora" or "sppara"
    d: int = 2
    batch: int = 2
    in_channels: int = 6
    out_channels: int = 5
    spatial: int | tuple[int, ...] = 7
    kernel: int | tuple[int, ...] = 3
    stride: int | tuple[int, ...] = 1
    padding: int | tuple[int, ...] | str = 1
    dilation: int | tuple[int, ...] = 1
    groups: int = 1
    rank: int | None = 2  # SPLoRA only; None: plain masked convolution
    keep_in: float | int | None = 0.5
    keep_out: float | int | None = 0.5
    bias: bool = True
    in_index_dtype: torch.dtype = torch.int64
    out_index_dtype: torch.dtype = torch.int64
    scale: float = 1.0
    noncontiguous: bool = False  # x and weight channels-last, adapters transposed, bias strided
    grads: tuple[str, ...] = DEFAULT_GRADS  # add "weight" to unfreeze W
    expanded_grad: bool = False  # grad_out with stride 0

    @property
    def names(self) -> tuple[str, ...]:
        return SPLORA_NAMES if self.kind == "splora" else SPPARA_NAMES

    @property
    def present(self) -> tuple[str, ...]:
        present = {"x", "weight"}
        if self.kind == "sppara":
            present.add("adapter")
        elif self.rank is not None:
            present |= {"lora_a", "lora_b"}
        if self.bias:
            present.add("bias")
        return tuple(name for name in self.names if name in present)

    @property
    def requested_grads(self) -> tuple[str, ...]:
        return tuple(name for name in self.present if name in self.grads)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return _as_tuple(self.spatial, self.d)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return _as_tuple(self.kernel, self.d)

    @property
    def out_spatial(self) -> tuple[int, ...]:
        """Output size by torch's formula, padding resolved here independently of spa_kernels."""
        stride, dilation = _as_tuple(self.stride, self.d), _as_tuple(self.dilation, self.d)
        if self.padding == "same":
            return self.spatial_shape
        padding = (0,) * self.d if self.padding == "valid" else _as_tuple(self.padding, self.d)
        return tuple(
            (n + 2 * p - dil * (k - 1) - 1) // s + 1
            for n, k, s, p, dil in zip(self.spatial_shape, self.kernel_shape, stride, padding, dilation, strict=True)
        )

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (self.batch, self.out_channels, *self.out_spatial)


@dataclasses.dataclass
class ConvCase:
    """Float64 master tensors of one case; every run casts from these."""

    spec: ConvSpec
    tensors: dict[str, Tensor | None]
    in_idx: Tensor | None
    out_idx: Tensor | None
    grad_out: Tensor

    @property
    def in_mask(self) -> Tensor:
        return _mask(self.in_idx, self.spec.in_channels)

    @property
    def out_mask(self) -> Tensor:
        return _mask(self.out_idx, self.spec.out_channels)

    @property
    def entry_mask(self) -> Tensor:
        """Active (C_out, C_in/groups) weight entries: output active and its group's input active."""
        spec = self.spec
        group_in, group_out = spec.in_channels // spec.groups, spec.out_channels // spec.groups
        rows = [self.in_mask[(o // group_out) * group_in:(o // group_out + 1) * group_in]
                for o in range(spec.out_channels)]
        return torch.stack(rows) & self.out_mask[:, None]

    @property
    def adapter_column_mask(self) -> Tensor:
        """Columns of A / P active in at least one group."""
        return self.in_mask.view(self.spec.groups, -1).any(0)

    def leaves(self, dtype: torch.dtype, *, via: torch.dtype | None = None,
               device: str = "cpu") -> dict[str, Tensor | None]:
        """Fresh leaf tensors in ``dtype`` on ``device`` (rounded through ``via`` first when given)."""
        leaves = {}
        for name in self.spec.names:
            master = self.tensors.get(name)
            if master is None:
                leaves[name] = None
                continue
            value = master.to(via).to(dtype) if via is not None else master.to(dtype)
            leaves[name] = value.to(device).detach().clone().requires_grad_(name in self.spec.requested_grads)
        return leaves

    def presented(self, leaves: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
        """The tensors handed to the API: strided views of the leaves when asked for."""
        if not self.spec.noncontiguous:
            return dict(leaves)
        views = {}
        for name, leaf in leaves.items():
            if leaf is None:
                views[name] = None
            elif leaf.dim() == 1:  # every other element of a twice-as-long buffer
                views[name] = torch.stack((leaf, torch.zeros_like(leaf)), dim=-1)[..., 0]
            elif leaf.dim() == 2:  # transposed memory
                views[name] = leaf.t().contiguous().t()
            else:  # channels last: same values, channel dimension innermost in memory
                views[name] = leaf.movedim(1, -1).contiguous().movedim(-1, 1)
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


def build_case(spec: ConvSpec, seed: int = 0) -> ConvCase:
    """Random tensors for ``spec``; the adapter term is as large as the base term."""
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    group_in = spec.in_channels // spec.groups
    fan_in = max(group_in * math.prod(spec.kernel_shape), 1)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=f64)

    tensors: dict[str, Tensor | None] = {name: None for name in TENSOR_NAMES}
    tensors["x"] = randn(spec.batch, spec.in_channels, *spec.spatial_shape)
    tensors["weight"] = randn(spec.out_channels, group_in, *spec.kernel_shape) / fan_in**0.5
    if spec.kind == "sppara":
        tensors["adapter"] = randn(spec.out_channels, group_in) / group_in**0.5
    elif spec.rank is not None:
        tensors["lora_a"] = randn(spec.rank, group_in) / group_in**0.5
        tensors["lora_b"] = randn(spec.out_channels, spec.rank) / spec.rank**0.5
    if spec.bias:
        tensors["bias"] = randn(spec.out_channels)
    in_idx = _pick_indices(spec.keep_in, spec.in_channels, spec.in_index_dtype, gen)
    out_idx = _pick_indices(spec.keep_out, spec.out_channels, spec.out_index_dtype, gen)
    grad_out = randn(*spec.out_shape)
    return ConvCase(spec, tensors, in_idx, out_idx, grad_out)


# Shapes that break kernels (docs/design.md section 6).  Small enough for the Triton
# interpreter: at most 12 channels, spatial at most 9, batch at most 2.
SPLORA_SPECS = {
    "2d-basic": ConvSpec(),
    "1d-basic": ConvSpec(d=1, spatial=9, in_channels=7, out_channels=6),
    "3d-basic": ConvSpec(d=3, spatial=5, in_channels=5, out_channels=4, rank=3),
    "3d-tiny": ConvSpec(d=3, spatial=(3, 4, 3), in_channels=3, out_channels=4),
    "2d-stride2": ConvSpec(spatial=9, stride=2),
    "2d-stride2-even-input": ConvSpec(spatial=(8, 6), stride=2, padding=0),
    "2d-dilation2": ConvSpec(spatial=9, dilation=2, padding=2),
    "2d-same-5x5": ConvSpec(kernel=5, padding="same"),
    "2d-same-dilation2": ConvSpec(spatial=9, dilation=2, padding="same", scale=0.5),
    "2d-valid": ConvSpec(padding="valid"),
    "1d-same-stride1": ConvSpec(d=1, spatial=7, kernel=5, padding="same"),
    "3d-stride2-dilation2": ConvSpec(d=3, spatial=(7, 5, 5), stride=2, dilation=2, padding=1, in_channels=4),
    "3d-same": ConvSpec(d=3, spatial=5, padding="same", in_channels=4, out_channels=3),
    "1d-stride2-dilation2": ConvSpec(d=1, spatial=9, stride=2, dilation=2, padding=1),
    "2d-1x1": ConvSpec(kernel=1, padding=0),
    "2d-1x1-stride2": ConvSpec(kernel=1, padding=0, stride=2),
    "2d-5x5-stride2": ConvSpec(kernel=5, padding=2, stride=2, spatial=9),
    "2d-padding-beyond-centre": ConvSpec(spatial=5, padding=3, stride=2),
    "2d-5x5-no-padding": ConvSpec(kernel=5, padding=0),
    "2d-asymmetric": ConvSpec(spatial=(7, 5), kernel=(3, 1), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    "3d-asymmetric": ConvSpec(d=3, spatial=(3, 5, 7), kernel=(1, 3, 5), padding=(0, 1, 2), in_channels=4),
    "output-1x1": ConvSpec(spatial=3, padding=0),
    "spatial-1": ConvSpec(spatial=1, padding=1, kernel=3),
    "batch1": ConvSpec(batch=1, in_channels=11, out_channels=7),
    "keep-1.0-int32": ConvSpec(keep_in=1.0, keep_out=1.0, in_index_dtype=torch.int32, out_index_dtype=torch.int32),
    "keep-0.1": ConvSpec(in_channels=12, out_channels=11, keep_in=0.1, keep_out=0.1),
    "all-pruned": ConvSpec(keep_in=0.0, keep_out=0.0),
    "inputs-all-pruned": ConvSpec(keep_in=0.0),
    "outputs-all-pruned": ConvSpec(keep_out=0.0),
    "one-channel": ConvSpec(in_channels=12, out_channels=9, keep_in=1, keep_out=1),
    "no-adapter": ConvSpec(rank=None),
    "no-bias": ConvSpec(bias=False, scale=-2.5),
    "plain-conv": ConvSpec(rank=None, bias=False, keep_in=None, keep_out=None),
    "no-indices": ConvSpec(keep_in=None, keep_out=None, rank=3),
    "noncontiguous": ConvSpec(noncontiguous=True, scale=-0.75),
    "noncontiguous-1d": ConvSpec(d=1, spatial=9, noncontiguous=True),
    "noncontiguous-3d-stride2": ConvSpec(d=3, spatial=5, stride=2, noncontiguous=True, in_channels=4),
    "rank-above-in": ConvSpec(rank=9, scale=0.5),
    "rank-1": ConvSpec(rank=1, in_channels=12, out_channels=12),
    "mixed-index-dtypes": ConvSpec(in_index_dtype=torch.int32, scale=0.3),
    "weight-grad": ConvSpec(grads=ALL_GRADS),
    "weight-grad-3d-stride2": ConvSpec(d=3, spatial=5, stride=2, grads=ALL_GRADS, in_channels=4),
    "weight-grad-no-adapter": ConvSpec(rank=None, grads=("x", "weight", "bias")),
    "adapter-grads-only": ConvSpec(grads=("lora_a", "lora_b")),
    "x-grad-only": ConvSpec(grads=("x",)),
    "forward-only": ConvSpec(grads=()),
    "scale-zero": ConvSpec(scale=0.0),
    "expanded-grad-out": ConvSpec(expanded_grad=True),
    "empty-batch": ConvSpec(batch=0, grads=ALL_GRADS),
}

SPPARA_SPECS = {
    "sppara-2d-basic": ConvSpec(kind="sppara"),
    "sppara-1d": ConvSpec(kind="sppara", d=1, spatial=9, in_channels=7),
    "sppara-3d": ConvSpec(kind="sppara", d=3, spatial=5, in_channels=4),
    "sppara-3d-tiny": ConvSpec(kind="sppara", d=3, spatial=(3, 3, 4), in_channels=4, out_channels=3, stride=2),
    "sppara-stride2-dilation2": ConvSpec(kind="sppara", spatial=9, stride=2, dilation=2, padding=2),
    "sppara-same-5x5": ConvSpec(kind="sppara", kernel=5, padding="same"),
    "sppara-1x1": ConvSpec(kind="sppara", kernel=1, padding=0, stride=2),
    "sppara-asymmetric": ConvSpec(kind="sppara", spatial=(7, 5), kernel=(1, 3), stride=(1, 2), padding=(0, 1)),
    "sppara-all-pruned": ConvSpec(kind="sppara", keep_in=0.0, keep_out=0.0),
    "sppara-inputs-all-pruned": ConvSpec(kind="sppara", keep_in=0.0),
    "sppara-one-channel": ConvSpec(kind="sppara", in_channels=12, out_channels=9, keep_in=1, keep_out=1),
    "sppara-keep-0.1": ConvSpec(kind="sppara", in_channels=12, out_channels=12, keep_in=0.1, keep_out=0.1),
    "sppara-no-bias-no-indices": ConvSpec(kind="sppara", bias=False, keep_in=None, keep_out=None),
    "sppara-noncontiguous": ConvSpec(kind="sppara", noncontiguous=True, in_index_dtype=torch.int32),
    "sppara-weight-grad": ConvSpec(kind="sppara", grads=ALL_GRADS),
    "sppara-adapter-grad-only": ConvSpec(kind="sppara", grads=("adapter",)),
    "sppara-batch1": ConvSpec(kind="sppara", batch=1),
    "sppara-empty-batch": ConvSpec(kind="sppara", batch=0, grads=ALL_GRADS),
}

# Reference backend only (the fused backends refuse groups != 1).
GROUPED_SPECS = {
    "grouped-2": ConvSpec(groups=2, in_channels=6, out_channels=4),
    "grouped-3-stride2": ConvSpec(groups=3, in_channels=6, out_channels=9, spatial=9, stride=2),
    "depthwise": ConvSpec(groups=6, in_channels=6, out_channels=6, rank=1),
    "depthwise-multiplier-same": ConvSpec(groups=4, in_channels=4, out_channels=8, padding="same", kernel=5),
    "grouped-1d": ConvSpec(d=1, groups=2, in_channels=4, out_channels=6, spatial=9, dilation=2, padding=2),
    "grouped-3d": ConvSpec(d=3, groups=2, in_channels=4, out_channels=4, spatial=5),
    "grouped-no-adapter": ConvSpec(groups=2, rank=None, in_channels=6, out_channels=4),
    "grouped-weight-grad": ConvSpec(groups=2, in_channels=6, out_channels=4, grads=ALL_GRADS),
    "grouped-inputs-all-pruned": ConvSpec(groups=2, in_channels=6, out_channels=4, keep_in=0.0),
    "grouped-no-indices": ConvSpec(groups=3, in_channels=6, out_channels=6, keep_in=None, keep_out=None),
    "grouped-noncontiguous": ConvSpec(groups=2, in_channels=6, out_channels=4, noncontiguous=True),
    "sppara-grouped": ConvSpec(kind="sppara", groups=2, in_channels=6, out_channels=4, grads=ALL_GRADS),
    "sppara-depthwise": ConvSpec(kind="sppara", groups=5, in_channels=5, out_channels=5, stride=2),
}

SPECS = {**SPLORA_SPECS, **SPPARA_SPECS}


@st.composite
def conv_specs(draw, *, kind: str | None = None, max_channels: int = 12, max_spatial: int = 9,
               max_spatial_3d: int = 6, groups: bool = False) -> ConvSpec:
    """Random cases: dimensionality, geometry, keep ratios, rank, layouts."""
    kind = kind or draw(st.sampled_from(["splora", "sppara"]), label="kind")
    d = draw(st.integers(1, 3), label="d")
    limit = max_spatial if d < 3 else max_spatial_3d
    kernel = tuple(draw(st.sampled_from([1, 3, 5]), label="kernel") for _ in range(d))
    stride = tuple(draw(st.integers(1, 2), label="stride") for _ in range(d))
    dilation = tuple(draw(st.integers(1, 2), label="dilation") for _ in range(d))
    if max(stride) == 1 and draw(st.booleans(), label="padding same"):
        padding = "same"
    else:
        padding = tuple(draw(st.integers(0, (k // 2) * dil + 1), label="padding")
                        for k, dil in zip(kernel, dilation, strict=True))
    pads = (0,) * d if padding == "same" else padding
    # Smallest input that gives an output of at least one.
    spatial = tuple(
        draw(st.integers(max(1, dil * (k - 1) + 1 - 2 * p), max(limit, dil * (k - 1) + 1)), label="spatial")
        for k, dil, p in zip(kernel, dilation, pads, strict=True)
    )
    n_groups = draw(st.sampled_from([1, 2, 3]), label="groups") if groups else 1
    in_channels = n_groups * draw(st.integers(1, max_channels // n_groups), label="in per group")
    out_channels = n_groups * draw(st.integers(1, max_channels // n_groups), label="out per group")
    keeps = st.one_of(st.none(), st.sampled_from([0.0, 1.0, 1]), st.floats(0.05, 1.0))
    grads = draw(st.sampled_from([DEFAULT_GRADS, ALL_GRADS, ("lora_a", "lora_b", "adapter"), ("x",)]), label="grads")
    return ConvSpec(
        kind=kind, d=d, batch=draw(st.integers(1, 2), label="batch"),
        in_channels=in_channels, out_channels=out_channels, spatial=spatial, kernel=kernel,
        stride=stride, padding=padding, dilation=dilation, groups=n_groups,
        rank=draw(st.one_of(st.none(), st.integers(1, 4), st.integers(5, 16)), label="rank"),
        keep_in=draw(keeps, label="keep_in"), keep_out=draw(keeps, label="keep_out"),
        bias=draw(st.booleans(), label="bias"),
        in_index_dtype=draw(st.sampled_from([torch.int32, torch.int64]), label="in_idx dtype"),
        out_index_dtype=draw(st.sampled_from([torch.int32, torch.int64]), label="out_idx dtype"),
        scale=draw(st.sampled_from([1.0, 0.5, -1.25]), label="scale"),
        noncontiguous=draw(st.booleans(), label="noncontiguous"),
        grads=grads,
    )


# --------------------------------------------------------------------------- running


def call_api(spec: ConvSpec, args: dict, in_idx, out_idx, backend: str | None) -> Tensor:
    """The public function for ``spec`` (``splora_conv{d}d`` or ``sppara_conv{d}d``)."""
    fn = getattr(spa_kernels, f"{spec.kind}_conv{spec.d}d")
    geometry = {"stride": spec.stride, "padding": spec.padding, "dilation": spec.dilation, "groups": spec.groups}
    if spec.kind == "splora":
        return fn(args["x"], args["weight"], args["lora_a"], args["lora_b"], args["bias"], in_idx, out_idx,
                  scale=spec.scale, backend=backend, **geometry)
    return fn(args["x"], args["weight"], args["adapter"], args["bias"], in_idx, out_idx, backend=backend,
              **geometry)


def _on(idx: Tensor | None, device: str) -> Tensor | None:
    return None if idx is None else idx.to(device)


def _to_cpu(result: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
    return {name: None if value is None else value.cpu() for name, value in result.items()}


def run_api(case: ConvCase, dtype: torch.dtype, backend: str | None,
            expected_backend: str | None = None, device: str = "cpu") -> dict[str, Tensor | None]:
    """Forward and requested gradients through the public API, on ``device``; results on the CPU.

    Also checks output shape/dtype, gradient shapes, and that the forward and
    backward op ran on ``expected_backend`` (default: ``backend``), so a silent
    fall-back cannot make the test vacuous.
    """
    spec = case.spec
    leaves = case.leaves(dtype, device=device)
    args = case.presented(leaves)
    names = spec.requested_grads
    with recording_backend_calls() as calls:
        y = call_api(spec, args, _on(case.in_idx, device), _on(case.out_idx, device), backend)
        result = _forward_and_grads(y, leaves, names, case.grad_output(dtype).to(device), materialize=False)
    assert y.dtype == dtype, f"output dtype {y.dtype}, expected {dtype}"
    assert tuple(y.shape) == spec.out_shape, f"output shape {tuple(y.shape)}, expected {spec.out_shape}"
    if spec.batch > 0:
        expected_calls = expected_backend_calls(expected_backend or backend, op_of(spec), bool(names))
        assert calls == expected_calls, f"op layer ran backends {calls}, expected {expected_calls}"
    for name in names:
        grad = result[name]
        assert grad is not None, f"gradient of {name} is None although {name} requires grad"
        assert grad.dtype == dtype and grad.shape == leaves[name].shape, (
            f"gradient of {name}: {grad.dtype} {tuple(grad.shape)}, expected {dtype} {tuple(leaves[name].shape)}"
        )
    return _to_cpu(result)


def _centre(weight: Tensor) -> tuple:
    return (slice(None), slice(None), *[k // 2 for k in weight.shape[2:]])


def dense_oracle(case: ConvCase, rounded_to: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """Forward and gradients of the dense masked formula in float64.

    Inputs are rounded to ``rounded_to`` first, so a low-precision run is
    compared with the exact result of the very inputs it was given.
    """
    spec = case.spec
    leaves = case.leaves(torch.float64, via=rounded_to)
    weight = leaves["weight"]
    centre = None
    if leaves.get("adapter") is not None:
        centre = leaves["adapter"]
    elif leaves.get("lora_a") is not None:
        centre = spec.scale * (leaves["lora_b"] @ leaves["lora_a"])
    w_eff = _with_centre(weight, centre) * case.entry_mask.to(torch.float64).reshape(*weight.shape[:2], *[1] * spec.d)
    bias = leaves["bias"] * case.out_mask.to(torch.float64) if leaves["bias"] is not None else None
    y = _CONV[spec.d](leaves["x"], w_eff, bias, spec.stride, spec.padding, spec.dilation, spec.groups)
    grad_out = case.grad_output(torch.float64, via=rounded_to)
    return _forward_and_grads(y, leaves, spec.requested_grads, grad_out, materialize=True)


def _with_centre(weight: Tensor, centre: Tensor | None) -> Tensor:
    """``weight`` with ``centre`` (C_out, C_in/groups) added at the centre tap."""
    if centre is None:
        return weight
    bump = torch.zeros_like(weight)
    bump[_centre(bump)] = 1
    return weight + bump * centre.reshape(*centre.shape, *[1] * (weight.dim() - 2))


def torch_low_precision(case: ConvCase, dtype: torch.dtype, device: str = "cpu") -> dict[str, Tensor]:
    """PyTorch's own computation in ``dtype`` on ``device`` (the error yardstick of low precision).

    Groups 1: the active block (gathered channels, effective weight, conv,
    scatter); grouped: the masked dense formula.  Everything in ``dtype``;
    the results come back on the CPU.
    """
    spec = case.spec
    leaves = case.leaves(dtype, device=device)
    x, weight, bias = leaves["x"], leaves["weight"], leaves["bias"]
    centre = None
    if leaves.get("adapter") is not None:
        centre = leaves["adapter"]
    elif leaves.get("lora_a") is not None:
        centre = spec.scale * (leaves["lora_b"] @ leaves["lora_a"])
    geometry = (spec.stride, spec.padding, spec.dilation, spec.groups)
    if spec.groups != 1:
        mask = case.entry_mask.to(device, dtype).reshape(*weight.shape[:2], *[1] * spec.d)
        bias_m = None if bias is None else bias * case.out_mask.to(device, dtype)
        y = _CONV[spec.d](x, _with_centre(weight, centre) * mask, bias_m, *geometry)
    else:
        in_idx = torch.arange(spec.in_channels) if case.in_idx is None else case.in_idx.long()
        out_idx = torch.arange(spec.out_channels) if case.out_idx is None else case.out_idx.long()
        in_idx, out_idx = in_idx.to(device), out_idx.to(device)
        w_os = weight.index_select(0, out_idx).index_select(1, in_idx)
        centre_os = None if centre is None else centre.index_select(0, out_idx).index_select(1, in_idx)
        bias_o = None if bias is None else bias.index_select(0, out_idx)
        if len(in_idx) and len(out_idx):
            y_o = _CONV[spec.d](x.index_select(1, in_idx), _with_centre(w_os, centre_os), bias_o, *geometry)
        else:  # an empty channel set: the bias of the active outputs only
            y_o = torch.zeros(spec.batch, len(out_idx), *spec.out_spatial, dtype=dtype, device=device)
            if bias_o is not None:
                y_o = y_o + bias_o.reshape(-1, *[1] * spec.d)
        y = torch.zeros(spec.out_shape, dtype=dtype, device=device).index_copy(1, out_idx, y_o)
    grad_out = case.grad_output(dtype).to(device)
    return _to_cpu(_forward_and_grads(y, leaves, spec.requested_grads, grad_out, materialize=True))


# --------------------------------------------------------------------------- pruned entries


def pruned_where(case: ConvCase) -> dict[str, Tensor]:
    """Bool masks of the pruned entries of the output and of every gradient."""
    spec = case.spec
    d = spec.d
    in_pruned, out_pruned = ~case.in_mask, ~case.out_mask
    column_pruned = ~case.adapter_column_mask
    return {
        "y": out_pruned.view(1, -1, *[1] * d).expand(spec.out_shape),
        "x": in_pruned.view(1, -1, *[1] * d).expand(spec.batch, spec.in_channels, *spec.spatial_shape),
        "weight": (~case.entry_mask).view(*case.entry_mask.shape, *[1] * d).expand(
            spec.out_channels, spec.in_channels // spec.groups, *spec.kernel_shape),
        "lora_a": column_pruned[None, :].expand(spec.rank or 0, -1),
        "lora_b": out_pruned[:, None].expand(-1, spec.rank or 0),
        "adapter": out_pruned[:, None] | column_pruned[None, :],
        "bias": out_pruned,
    }


def assert_pruned_exact_zero(name: str, result: dict[str, Tensor | None], case: ConvCase) -> None:
    """Output and gradients are exactly zero at every pruned entry (docs/design.md section 1)."""
    failures = []
    for key, where in pruned_where(case).items():
        value = result.get(key)
        if value is None:
            continue
        selected = value[where]
        nonzero = int((selected != 0).sum())
        if nonzero:
            failures.append(f"{name}: {key} has {nonzero} non-zero pruned entries, "
                            f"largest {float(selected.abs().max()):.3e}")
    for failure in failures:
        print(failure)
    assert not failures, "\n".join(failures)


def poison_pruned(case: ConvCase, value: float = float("nan")) -> ConvCase:
    """A copy of ``case`` with ``value`` in every pruned entry of the inputs and of grad_out."""
    where = pruned_where(case)
    tensors = {}
    for name, tensor in case.tensors.items():
        tensors[name] = None if tensor is None else tensor.masked_fill(where[name], value)
    grad_out = case.grad_out.masked_fill(where["y"], value)
    return dataclasses.replace(case, tensors=tensors, grad_out=grad_out)


# --------------------------------------------------------------------------- backends


def implements(backend: str, op: str) -> bool:
    return backend_policy.get(backend).implements(op)


def conv_backend_params(op: str) -> list:
    """``pytest.param``s of every non-reference CPU backend that implements ``op``: for "cpu" one per ISA, and its small-problem loops."""
    params = []
    for name in spa_kernels.backends("cpu"):
        if name == "reference" or not implements(name, op):
            continue
        if name == "cpu":
            isas = spa_kernels.backend.cpu.supported_isas() or [None]
            params += [pytest.param((name, isa), id=f"cpu-{isa}" if isa else "cpu") for isa in isas]
            if isas != [None]:  # and the small-problem loops, wherever a case is small enough
                params.append(pytest.param((name, SMALL_PROBLEMS), id=f"cpu-{SMALL_PROBLEMS}"))
        else:
            params.append(pytest.param((name, None), id=name))
    if not params:
        reason = (
            f"no non-reference backend implements {op} on CPU: backends('cpu') == {spa_kernels.backends('cpu')} "
            "(build 'cpu' with `make build`; 'triton' needs Triton and TRITON_INTERPRET=1)"
        )
        params.append(pytest.param(None, marks=pytest.mark.skip(reason=reason), id="none-built"))
    return params


def op_of(spec: ConvSpec) -> str:
    return f"{spec.kind}_conv"


def reference_truth(case: ConvCase, rounded_to: torch.dtype) -> dict[str, Tensor]:
    """The reference backend in float64 on the inputs rounded to ``rounded_to``: what backends must match.

    The reference itself is held to the dense oracle by test_conv_reference.py.
    """
    spec = case.spec
    leaves = case.leaves(torch.float64, via=rounded_to)
    names = spec.requested_grads
    y = call_api(spec, leaves, case.in_idx, case.out_idx, "reference")
    return _forward_and_grads(y, leaves, names, case.grad_output(torch.float64, via=rounded_to), materialize=True)
