"""Autograd and op-registration checks of the convolution ops on every backend.

- ``torch.autograd.gradcheck`` in float64 on tiny shapes: the registered
  backward against finite differences, for every input that can need a grad,
  on the reference and on every backend that runs float64.
- ``torch.library.opcheck`` on ``splora_conv``, ``splora_conv_backward``,
  ``sppara_conv`` and ``sppara_conv_backward``: schema, fake kernel, autograd
  registration and AOT dispatch with dynamic shapes.
- ``torch.compile(fullgraph=True)``: the public functions trace without graph
  breaks and the compiled result equals eager, also with dynamic shapes.
"""

from __future__ import annotations

import pytest
import torch
from support.conv_cases import (
    ALL_GRADS,
    ConvSpec,
    build_case,
    call_api,
    conv_backend_params,
    implements,
    op_of,
    reference_truth,
)
from support.linear_cases import check_results, forced_isa, skip_unless_available

import spa_kernels
from spa_kernels import functional

REFERENCE = pytest.param(("reference", None), id="reference")
BACKENDS = {
    "splora_conv": [REFERENCE, *conv_backend_params("splora_conv")],
    "sppara_conv": [REFERENCE, *conv_backend_params("sppara_conv")],
}

TINY_SPECS = {
    "tiny-2d-stride2": ConvSpec(batch=1, in_channels=3, out_channels=3, spatial=4, stride=2, keep_in=2,
                                keep_out=2, scale=0.7, grads=ALL_GRADS),
    "tiny-1d-same-dilation2": ConvSpec(d=1, in_channels=3, out_channels=2, spatial=6, dilation=2,
                                       padding="same", keep_in=None, keep_out=1, grads=ALL_GRADS),
    "tiny-3d": ConvSpec(d=3, batch=1, in_channels=2, out_channels=2, spatial=3, rank=1, keep_in=None,
                        keep_out=None, scale=-1.5, grads=ALL_GRADS),
    "tiny-5x1-noncontiguous-int32": ConvSpec(in_channels=3, out_channels=3, spatial=(5, 3), kernel=(5, 1),
                                             padding=(1, 0), noncontiguous=True, in_index_dtype=torch.int32,
                                             grads=ALL_GRADS),
    "tiny-no-adapter": ConvSpec(rank=None, in_channels=4, out_channels=3, spatial=3, grads=ALL_GRADS),
    "tiny-all-pruned": ConvSpec(in_channels=2, out_channels=2, spatial=3, keep_in=0.0, keep_out=0.0,
                                grads=ALL_GRADS),
    "tiny-adapter-only": ConvSpec(in_channels=3, out_channels=3, spatial=4, grads=("lora_a", "lora_b")),
    "tiny-sppara-2d": ConvSpec(kind="sppara", batch=1, in_channels=3, out_channels=3, spatial=4, stride=2,
                               keep_in=2, keep_out=2, grads=ALL_GRADS),
    "tiny-sppara-1d-padding-beyond-centre": ConvSpec(kind="sppara", d=1, in_channels=3, out_channels=2,
                                                     spatial=4, padding=2, keep_out=None, grads=ALL_GRADS),
}
# Reference only: the fused backends refuse groups != 1.
TINY_GROUPED_SPECS = {
    "tiny-grouped": ConvSpec(groups=2, in_channels=4, out_channels=4, spatial=3, keep_in=3, keep_out=3,
                             grads=ALL_GRADS),
    "tiny-sppara-depthwise": ConvSpec(kind="sppara", groups=3, in_channels=3, out_channels=3, spatial=4,
                                      stride=2, keep_in=2, grads=ALL_GRADS),
}


def _gradcheck_params():
    params = []
    for spec_name, spec in TINY_SPECS.items():
        for backend in BACKENDS[op_of(spec)]:
            params.append(pytest.param(spec_name, backend.values[0], id=f"{backend.id}-{spec_name}",
                                       marks=backend.marks))
    for spec_name in TINY_GROUPED_SPECS:
        params.append(pytest.param(spec_name, ("reference", None), id=f"reference-{spec_name}"))
    return params


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize(("spec_name", "backend_param"), _gradcheck_params())
def test_gradcheck_float64(spec_name, backend_param):
    backend, isa = backend_param
    skip_unless_available(backend, torch.float64)
    case = build_case({**TINY_SPECS, **TINY_GROUPED_SPECS}[spec_name])
    leaves = case.leaves(torch.float64)
    names = case.spec.requested_grads
    assert names, "a gradcheck case must differentiate something"

    def conv(*differentiable):
        args = case.presented({**leaves, **dict(zip(names, differentiable, strict=True))})
        return call_api(case.spec, args, case.in_idx, case.out_idx, backend)

    with forced_isa(isa):
        assert torch.autograd.gradcheck(conv, tuple(leaves[n] for n in names), eps=1e-6, atol=1e-8, rtol=1e-6)


# --------------------------------------------------------------------------- opcheck


def _op_backends(op: str) -> list[str]:
    return [name for name in spa_kernels.backends("cpu") if implements(name, op)]


def _index(idx):
    return None if idx is None else idx.long()


OPCHECK_SPECS = {
    "splora-2d-stride2": ConvSpec(in_channels=5, out_channels=4, spatial=5, stride=2),
    "splora-1d-dense-weight-grad": ConvSpec(d=1, rank=None, bias=False, keep_in=None, keep_out=None,
                                            spatial=6, dilation=2, padding=2, grads=("x", "weight")),
    "splora-grouped": ConvSpec(groups=2, in_channels=4, out_channels=4, spatial=4),
    "sppara-3d": ConvSpec(kind="sppara", d=3, in_channels=3, out_channels=2, spatial=3),
    "sppara-grouped": ConvSpec(kind="sppara", groups=3, in_channels=3, out_channels=6, spatial=4),
}


def _opcheck_params(kind: str):
    params = []
    for spec_name, spec in OPCHECK_SPECS.items():
        if spec.kind != kind:
            continue
        backends = ["reference"] if spec.groups != 1 else _op_backends(op_of(spec))
        params += [pytest.param(spec_name, backend, id=f"{backend}-{spec_name}") for backend in backends]
    return params


def _geometry_args(spec: ConvSpec) -> tuple:
    """stride, padding, dilation as the op takes them (lists of ints, padding explicit), and groups."""
    def as_list(value):
        return list(value) if isinstance(value, tuple) else [value] * spec.d

    return as_list(spec.stride), as_list(spec.padding), as_list(spec.dilation), spec.groups


def _op_args(spec_name: str, backend: str, *, detach: bool = False):
    case = build_case(OPCHECK_SPECS[spec_name])
    leaves = case.leaves(torch.float32)
    if detach:
        leaves = {k: None if v is None else v.detach() for k, v in leaves.items()}
    geometry = _geometry_args(case.spec)
    return case, leaves, geometry


@pytest.mark.parametrize(("spec_name", "backend"), _opcheck_params("splora"))
def test_opcheck_splora_conv(spec_name, backend):
    case, t, geometry = _op_args(spec_name, backend)
    torch.library.opcheck(
        torch.ops.spa_kernels.splora_conv.default,
        (t["x"], t["weight"], t["lora_a"], t["lora_b"], t["bias"], _index(case.in_idx), _index(case.out_idx),
         *geometry, case.spec.scale, backend),
    )


@pytest.mark.parametrize("output_mask", [[True, False, True, True, True], [False, True, False, True, False]],
                         ids=["x-adapters-bias", "weight-lora_b"])
@pytest.mark.parametrize(("spec_name", "backend"), _opcheck_params("splora"))
def test_opcheck_splora_conv_backward(spec_name, backend, output_mask):
    case, t, geometry = _op_args(spec_name, backend, detach=True)
    torch.library.opcheck(
        torch.ops.spa_kernels.splora_conv_backward.default,
        (case.grad_out.float(), t["x"], t["weight"], t["lora_a"], t["lora_b"], _index(case.in_idx),
         _index(case.out_idx), *geometry, case.spec.scale, backend, output_mask),
    )


@pytest.mark.parametrize(("spec_name", "backend"), _opcheck_params("sppara"))
def test_opcheck_sppara_conv(spec_name, backend):
    case, t, geometry = _op_args(spec_name, backend)
    torch.library.opcheck(
        torch.ops.spa_kernels.sppara_conv.default,
        (t["x"], t["weight"], t["adapter"], t["bias"], _index(case.in_idx), _index(case.out_idx), *geometry,
         backend),
    )


@pytest.mark.parametrize("output_mask", [[True, False, True, True], [False, True, True, False]],
                         ids=["x-adapter-bias", "weight-adapter"])
@pytest.mark.parametrize(("spec_name", "backend"), _opcheck_params("sppara"))
def test_opcheck_sppara_conv_backward(spec_name, backend, output_mask):
    case, t, geometry = _op_args(spec_name, backend, detach=True)
    torch.library.opcheck(
        torch.ops.spa_kernels.sppara_conv_backward.default,
        (case.grad_out.float(), t["x"], t["weight"], t["adapter"], _index(case.in_idx), _index(case.out_idx),
         *geometry, backend, output_mask),
    )


# --------------------------------------------------------------------------- torch.compile


def _eager_and_compiled(fn, case, **compile_options):
    results = []
    compiled_fn = torch.compile(fn, fullgraph=True, backend="aot_eager", **compile_options)
    for run in (fn, compiled_fn):
        leaves = case.leaves(torch.float32)
        y = run(leaves)
        wanted = [leaves[n] for n in case.spec.requested_grads]
        grads = torch.autograd.grad(y, wanted, grad_outputs=case.grad_out.float())
        results.append({"y": y.detach(), **dict(zip(case.spec.requested_grads, grads, strict=True))})
    return results


@pytest.mark.parametrize("kind", ["splora", "sppara"])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_compile_public_api_fullgraph(backend, kind):
    """``splora_conv2d`` / ``sppara_conv2d`` with ``padding="same"`` compile in one graph.

    Without index lists: checking them reads their values, which cannot be
    traced; modules go through the trusted entry points (next test).
    """
    if backend not in _op_backends(f"{kind}_conv"):
        pytest.skip(f"{backend!r} does not run {kind}_conv here")
    torch._dynamo.reset()
    case = build_case(ConvSpec(kind=kind, in_channels=5, out_channels=4, spatial=5, padding="same",
                               dilation=2, keep_in=None, keep_out=None, grads=ALL_GRADS))

    def fn(t):
        return call_api(case.spec, t, None, None, backend)

    eager, compiled = _eager_and_compiled(fn, case)
    check_results(f"compiled[{backend}, {kind}]", compiled, {k: v.double() for k, v in eager.items()},
                  torch.float32)


def _trusted(spec: ConvSpec, t: dict, in_idx, out_idx, backend: str):
    geometry = {"stride": spec.stride, "padding": spec.padding, "dilation": spec.dilation, "groups": spec.groups}
    if spec.kind == "splora":
        return functional.splora_conv_trusted(t["x"], t["weight"], t["lora_a"], t["lora_b"], t["bias"], in_idx,
                                               out_idx, scale=spec.scale, backend=backend, **geometry)
    return functional.sppara_conv_trusted(t["x"], t["weight"], t["adapter"], t["bias"], in_idx, out_idx,
                                           backend=backend, **geometry)


@pytest.mark.parametrize("kind", ["splora", "sppara"])
def test_compile_trusted_entry_point_with_indices(kind):
    """The entry points modules use take index lists and still compile in one graph."""
    torch._dynamo.reset()
    case = build_case(ConvSpec(kind=kind, in_channels=5, out_channels=4, spatial=5, stride=2, grads=ALL_GRADS))

    def fn(t):
        return _trusted(case.spec, t, case.in_idx, case.out_idx, "reference")

    eager, compiled = _eager_and_compiled(fn, case)
    check_results(f"compiled-trusted[{kind}]", compiled, {k: v.double() for k, v in eager.items()}, torch.float32)
    expected = reference_truth(case, torch.float32)
    check_results(f"trusted[{kind}]", eager, expected, torch.float32)


def test_compile_dynamic_shapes():
    """One dynamic-shape graph serves several batch and spatial sizes (symbolic fake kernel)."""
    torch._dynamo.reset()
    spec = ConvSpec(in_channels=4, out_channels=3, stride=2, kernel=3, padding=1)
    base = build_case(spec)
    params = {n: None if t is None else t.float() for n, t in base.tensors.items()}

    def fn(x):
        return _trusted(spec, {**params, "x": x}, base.in_idx, base.out_idx, "reference")

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch, size in ((1, 5), (3, 8), (2, 11)):
        x = torch.randn(batch, spec.in_channels, size, size + 2)
        expected = fn(x)
        got = compiled(x)
        assert got.shape == expected.shape, f"compiled shape {tuple(got.shape)} != eager {tuple(expected.shape)}"
        check_results(f"compiled-dynamic[N={batch}, {size}]", {"y": got}, {"y": expected.double()}, torch.float32)


def test_double_backward_is_refused_not_wrong():
    """The backward op has no derivative: a second derivative must raise, not return garbage."""
    case = build_case(ConvSpec(in_channels=3, out_channels=3, spatial=4, grads=ALL_GRADS))
    leaves = case.leaves(torch.float64)
    y = call_api(case.spec, leaves, case.in_idx, case.out_idx, "reference")
    (grad_x,) = torch.autograd.grad(y, leaves["x"], grad_outputs=torch.ones_like(y), create_graph=True)
    with pytest.raises(RuntimeError, match="has no derivative"):
        torch.autograd.grad(grad_x.sum(), leaves["lora_a"])
