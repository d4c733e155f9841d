"""spa_kernels.nn SPLoRAConv1d/2d/3d and SPPaRAConv1d/2d/3d: forward, gradients, masks,
conversion and sp_adapters interop.

Every value is checked against an independent float64 ``torch.nn.ConvNd`` whose
weight is ``W`` plus the adapter at the centre tap, with the masks applied by
multiplication (no index lists), or against sp_adapters.  Shapes stay small
(channels <= 12, spatial <= 9, batch <= 2) so the Triton interpreter stays fast.
"""

from __future__ import annotations

import copy

import pytest
import sp_adapters
import torch
from torch import nn

import spa_kernels
from spa_kernels import backend as backend_policy
from spa_kernels.nn import (
    SPLoRAConv1d,
    SPLoRAConv2d,
    SPLoRAConv3d,
    SPPaRAConv1d,
    SPPaRAConv2d,
    SPPaRAConv3d,
)

FP32_TOL = 1e-4  # docs/design.md section 6, relative to the float64 result
IN, OUT = 6, 8
SPATIAL = {1: (9,), 2: (7, 6), 3: (4, 3, 4)}
TORCH_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}

# (ours, sp_adapters' counterpart, number of spatial dimensions)
CLASSES = [
    (SPLoRAConv1d, sp_adapters.SPLoRAConv1d, 1),
    (SPLoRAConv2d, sp_adapters.SPLoRAConv2d, 2),
    (SPLoRAConv3d, sp_adapters.SPLoRAConv3d, 3),
    (SPPaRAConv1d, sp_adapters.SPPaRAConv1d, 1),
    (SPPaRAConv2d, sp_adapters.SPPaRAConv2d, 2),
    (SPPaRAConv3d, sp_adapters.SPPaRAConv3d, 3),
]
CLASS_IDS = [ours.__name__ for ours, _, _ in CLASSES]
SPLORA = (SPLoRAConv1d, SPLoRAConv2d, SPLoRAConv3d)


def has_conv_kernels(name: str) -> bool:
    impl = backend_policy.get(name)
    return impl.implements("splora_conv") and impl.implements("sppara_conv")


# Backends that run convolutions here; kernels may land backend by backend.
BACKENDS = [name for name in spa_kernels.backends("cpu") if has_conv_kernels(name)]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


def skip_slow_interpreter(backend: str, nd: int, what: str = "backward") -> None:
    """The Triton interpreter needs tens of seconds for a 3-D backward; forward covers 3-D there."""
    if backend == "triton" and nd == 3:
        pytest.skip(f"3-D {what} in the Triton interpreter is too slow for the unit tests")


@pytest.fixture(params=CLASSES, ids=CLASS_IDS)
def kind(request):
    return request.param


def is_splora(layer) -> bool:
    return isinstance(layer, SPLORA)


def random_mask(n: int, keep: float) -> torch.Tensor:
    mask = torch.rand(n) < keep
    mask[torch.randint(n, ())] = True  # at least one active channel
    return mask


def randomise(layer) -> None:
    """Adapter and bias of order 1: the default init_range (1e-4) would hide a wrong adapter term."""
    with torch.no_grad():
        if is_splora(layer):
            layer.adapter.cols.normal_()
        else:
            layer.adapter.normal_()
        if layer.bias is not None:
            layer.bias.normal_()


def make_layer(cls, backend=None, keep=0.5, in_channels=IN, out_channels=OUT, kernel_size=3,
               **kwargs):
    extra = {"rank": 3} if cls in SPLORA else {}
    layer = cls(in_channels, out_channels, kernel_size, backend=backend, **extra, **kwargs)
    randomise(layer)
    if keep < 1.0:
        layer.set_masks(random_mask(in_channels, keep), random_mask(out_channels, keep))
    return layer


def make_input(layer, batch: int = 2, requires_grad: bool = False) -> torch.Tensor:
    nd = layer.weight.dim() - 2
    return torch.randn(batch, layer.in_channels, *SPATIAL[nd], requires_grad=requires_grad)


def centre_term(layer) -> torch.Tensor:
    if is_splora(layer):
        return layer.scale * layer.adapter.cols[0] @ layer.adapter.rows[0]
    return layer.adapter


def dense_oracle(layer, x: torch.Tensor) -> torch.Tensor:
    """``conv(x ∘ m_in, W_eff ∘ m_out, b ∘ m_out) ∘ m_out`` in float64, differentiable in the layer.

    The convolution itself (padding modes, ``"same"``) is ``torch.nn.ConvNd``'s.
    """
    nd = layer.weight.dim() - 2
    geometry = TORCH_CONV[nd](
        layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
        layer.dilation, layer.groups, False, layer.padding_mode, device="meta",
    )
    centre = (slice(None), slice(None)) + tuple(k // 2 for k in layer.kernel_size)
    delta = torch.zeros_like(layer.weight, dtype=torch.float64)
    delta[centre] = centre_term(layer).double()
    out_mask = layer.out_mask.double()
    weight = (layer.weight.double() + delta) * out_mask.view(-1, *(1,) * (nd + 1))
    bias = None if layer.bias is None else layer.bias.double() * out_mask
    x_masked = x.double() * layer.in_mask.double().view(-1, *(1,) * nd)
    return geometry._conv_forward(x_masked, weight, bias) * out_mask.view(-1, *(1,) * nd)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = FP32_TOL) -> None:
    """``actual`` within ``tol`` of the float64 ``expected``, relative to its largest entry."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs()
    ref = expected.double().abs().max().item() if expected.numel() else 0.0
    max_err = err.max().item() if err.numel() else 0.0
    where = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape)) if err.numel() else ()
    print(f"{what}: max abs error {max_err:.3e} at {where}, max |expected| {ref:.3e}")
    assert max_err <= tol * max(ref, 1.0), f"{what}: max abs error {max_err:.3e} at {where}"


def pruned(mask: torch.Tensor) -> torch.Tensor:
    return (~mask).nonzero().flatten()


def adapter_grads(layer) -> dict[str, torch.Tensor]:
    if is_splora(layer):
        return {"rows": layer.adapter.rows.grad, "cols": layer.adapter.cols.grad}
    return {"adapter": layer.adapter.grad}


# ----------------------------------------------------------------------------- forward


def test_forward_matches_oracle_and_pruned_outputs_are_zero(kind, backend):
    cls, _, _ = kind
    layer = make_layer(cls, backend=backend)
    x = make_input(layer)
    y = layer(x)
    assert_close(y, dense_oracle(layer, x), "y")
    assert (y[:, pruned(layer.out_mask)] == 0).all(), "pruned outputs must be exactly zero"
    x_changed = x.clone()
    x_changed[:, pruned(layer.in_mask)] = 1e6
    assert torch.equal(layer(x_changed), y), "pruned inputs must be ignored"


@pytest.mark.parametrize(
    "geometry",
    [
        {"stride": 2},
        {"dilation": 2, "padding": 2},
        {"padding": "same"},
        {"padding": "same", "dilation": 2},
        {"padding": "valid", "stride": (2, 1)},
        {"kernel_size": (3, 1), "padding": (1, 0)},
        {"kernel_size": 5, "padding": 1, "bias": False},
        {"padding": 1, "padding_mode": "reflect"},
        {"padding": "same", "padding_mode": "circular"},
        {"padding": 1, "padding_mode": "replicate", "stride": 2},
    ],
    ids=lambda g: ",".join(f"{k}={v}" for k, v in g.items()),
)
@pytest.mark.parametrize("cls", [SPLoRAConv2d, SPPaRAConv2d])
def test_geometry_forward_merge_and_compact(cls, geometry, backend):
    if backend == "triton" and set(geometry) - {"stride", "dilation", "padding"}:
        pytest.skip("the Triton interpreter is slow: the kernel sees the same arguments as in other cases")
    layer = make_layer(cls, backend=backend, **geometry)
    x = make_input(layer)
    expected = dense_oracle(layer, x)
    y = layer(x)
    assert_close(y, expected, "y")
    with torch.no_grad():
        merged = layer.to_module()
        assert (merged.padding, merged.padding_mode, merged.stride) == (layer.padding, layer.padding_mode, layer.stride)
        assert_close(merged(x), expected, "to_module()(x)")
        active_in, active_out = layer.in_mask.nonzero().flatten(), layer.out_mask.nonzero().flatten()
        assert_close(layer.compact()(x[:, active_in]), expected[:, active_out], "compact()(x[:, S])")


@pytest.mark.parametrize("cls", [SPLoRAConv1d, SPPaRAConv3d])
def test_stride_and_dilation_in_1d_and_3d(cls, backend):
    layer = make_layer(cls, backend=backend, stride=2, dilation=(2,) * (cls._nd), padding=1)
    x = make_input(layer)
    assert_close(layer(x), dense_oracle(layer, x), "y")


def test_unbatched_input(kind):
    cls, _, _ = kind
    layer = make_layer(cls)
    x = make_input(layer, batch=1)
    y = layer(x[0])
    assert y.shape == layer(x).shape[1:]
    assert_close(y, dense_oracle(layer, x)[0], "y unbatched")


def test_all_channels_pruned(kind, backend):
    cls, _, _ = kind
    layer = make_layer(cls, backend=backend, keep=1.0)
    layer.set_masks(torch.zeros(IN, dtype=torch.bool), torch.zeros(OUT, dtype=torch.bool))
    x = make_input(layer, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    for name, grad in {"x": x.grad, "bias": layer.bias.grad, **adapter_grads(layer)}.items():
        assert grad is None or torch.equal(grad, torch.zeros_like(grad)), name


# ----------------------------------------------------------------------------- gradients


def oracle_gradients(layer, x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """float64 autograd through :func:`dense_oracle` on a detached copy of the layer."""
    twin = copy.deepcopy(layer).double()
    twin.weight.requires_grad_(True)
    for p in twin.parameters():
        p.grad = None
    x64 = x.detach().double().requires_grad_(True)
    (dense_oracle(twin, x64) * grad_out.double()).sum().backward()
    return {"x": x64.grad, "weight": twin.weight.grad, "bias": twin.bias.grad, **adapter_grads(twin)}


def assert_zero_at_pruned_adapter_entries(layer) -> None:
    in_off, out_off = pruned(layer.in_mask), pruned(layer.out_mask)
    assert (layer.bias.grad[out_off] == 0).all(), "bias grad at pruned outputs"
    if is_splora(layer):
        assert (layer.adapter.rows.grad[:, :, in_off] == 0).all(), "rows grad at pruned inputs"
        assert (layer.adapter.cols.grad[:, out_off] == 0).all(), "cols grad at pruned outputs"
    else:
        assert (layer.adapter.grad[:, in_off] == 0).all(), "adapter grad at pruned inputs"
        assert (layer.adapter.grad[out_off] == 0).all(), "adapter grad at pruned outputs"


def test_gradients_match_oracle_and_vanish_at_pruned_entries(kind, backend):
    cls, _, nd = kind
    skip_slow_interpreter(backend, nd)
    layer = make_layer(cls, backend=backend, stride=2, padding=1)
    x = make_input(layer, requires_grad=True)
    y = layer(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    expected = oracle_gradients(layer, x, grad_out)
    got = {"x": x.grad, "bias": layer.bias.grad, **adapter_grads(layer)}
    for name, grad in got.items():
        assert_close(grad, expected[name], f"grad {name}")
    assert (x.grad[:, pruned(layer.in_mask)] == 0).all()
    assert_zero_at_pruned_adapter_entries(layer)
    assert layer.weight.grad is None, "the frozen weight must not get a gradient"
    assert layer.weight.requires_grad is False


def test_masked_fine_tuning_weight_gradient(kind, backend):
    cls, _, nd = kind
    skip_slow_interpreter(backend, nd)
    layer = make_layer(cls, backend=backend, padding=1)
    layer.weight.requires_grad_(True)
    x = make_input(layer)
    y = layer(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    assert layer.weight.requires_grad, "requires_grad=True must be honoured, not reset"
    assert_close(layer.weight.grad, oracle_gradients(layer, x, grad_out)["weight"], "grad weight")
    outside_block = ~(layer.out_mask[:, None] & layer.in_mask[None, :])
    assert (layer.weight.grad[outside_block] == 0).all()


# ----------------------------------------------------------------------------- train, merge, compact


def test_from_module_train_step_then_merge_and_compact(kind, backend):
    cls, _, nd = kind
    skip_slow_interpreter(backend, nd)
    source = TORCH_CONV[nd](IN, OUT, 3, padding=1)
    extra = {"rank": 3} if cls in SPLORA else {}
    layer = cls.from_module(source, init_range=0.1, backend=backend, **extra)
    assert type(layer) is cls and layer.weight.requires_grad is False
    assert torch.equal(layer.weight, source.weight) and layer.weight.data_ptr() != source.weight.data_ptr()
    in_mask, out_mask = random_mask(IN, 0.6), random_mask(OUT, 0.6)
    layer.set_masks(in_mask, out_mask)
    before = copy.deepcopy(layer)
    trainable = [p for p in layer.parameters() if p.requires_grad]
    expected_trainable = [layer.adapter.rows, layer.adapter.cols] if is_splora(layer) else [layer.adapter]
    assert {id(p) for p in trainable} == {id(p) for p in [*expected_trainable, layer.bias]}
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    x = make_input(layer)
    layer(x).square().mean().backward()
    assert_zero_at_pruned_adapter_entries(layer)
    optimizer.step()

    assert torch.equal(layer.weight, source.weight), "the frozen weight must not move"
    assert torch.equal(layer.bias[pruned(out_mask)], before.bias[pruned(out_mask)])
    assert not torch.equal(layer.bias, before.bias), "the step must change the bias"

    with torch.no_grad():
        expected = dense_oracle(layer, x)
        assert_close(layer(x), expected, "y after step")
        merged = layer.to_module()
        assert type(merged) is TORCH_CONV[nd] and merged.weight.shape == layer.weight.shape
        assert_close(merged(x), expected, "to_module()(x)")
        assert (merged(x)[:, pruned(out_mask)] == 0).all()
        assert (merged.bias[pruned(out_mask)] == 0).all()
        outside_block = ~(out_mask[:, None] & in_mask[None, :])
        assert (merged.weight[outside_block] == 0).all()

        small = layer.compact()
        active_in, active_out = in_mask.nonzero().flatten(), out_mask.nonzero().flatten()
        assert type(small) is TORCH_CONV[nd]
        assert small.weight.shape == (len(active_out), len(active_in), *layer.kernel_size)
        assert_close(small(x[:, active_in]), expected[:, active_out], "compact()(x[:, S])")
        assert torch.equal(small.bias, layer.bias[active_out])
    assert small.weight.requires_grad and small.weight.grad_fn is None


@pytest.mark.parametrize("masked", ["none", "in", "out"])
@pytest.mark.parametrize("cls", [SPLoRAConv2d, SPPaRAConv2d])
def test_to_module_and_compact_with_one_mask(cls, masked):
    layer = make_layer(cls, keep=1.0, padding=1)
    if masked == "in":
        layer.set_masks(in_mask=random_mask(IN, 0.5))
    elif masked == "out":
        layer.set_masks(out_mask=random_mask(OUT, 0.5))
    x = make_input(layer)
    expected = dense_oracle(layer, x)
    with torch.no_grad():
        assert_close(layer.to_module()(x), expected, "to_module()(x)")
        assert_close(layer.compact()(x[:, layer.in_mask]), expected[:, layer.out_mask], "compact()(x[:, S])")
        merged = layer.to_module()
        merged.weight.zero_()
    assert layer.weight.abs().sum() > 0, "to_module must not alias the layer's weight"


# ----------------------------------------------------------------------------- groups


@pytest.mark.parametrize("cls", [SPLoRAConv2d, SPPaRAConv2d])
def test_grouped_layer_matches_oracle(cls):
    layer = make_layer(cls, groups=2, padding=1)
    assert layer.weight.shape[1] == IN // 2
    x = make_input(layer, requires_grad=True)
    y = layer(x)
    assert_close(y, dense_oracle(layer, x), "y grouped")
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    expected = oracle_gradients(layer, x, grad_out)
    for name, grad in {"x": x.grad, "bias": layer.bias.grad, **adapter_grads(layer)}.items():
        assert_close(grad, expected[name], f"grad {name}")
    with torch.no_grad():
        assert_close(layer.to_module()(x), dense_oracle(layer, x), "to_module()(x)")
    with pytest.raises(NotImplementedError, match="groups"):
        layer.compact()


@pytest.mark.parametrize("cls", [SPLoRAConv2d, SPPaRAConv2d])
def test_depthwise_layer_merge_and_compact(cls):
    channels = 6
    layer = make_layer(cls, in_channels=channels, out_channels=channels, groups=channels, padding=1, keep=1.0)
    x = make_input(layer)
    with torch.no_grad():
        assert_close(layer.compact()(x), dense_oracle(layer, x), "compact() unpruned")
        mask = random_mask(channels, 0.5)
        layer.set_masks(mask, mask)
        expected = dense_oracle(layer, x)
        assert_close(layer(x), expected, "y depthwise")
        assert_close(layer.to_module()(x), expected, "to_module()(x)")
        small = layer.compact()
        assert small.groups == small.in_channels == small.out_channels == int(mask.sum())
        assert_close(small(x[:, mask]), expected[:, mask], "compact()(x[:, S])")
        other = mask.clone()
        other[0] = ~other[0]
        layer.set_masks(out_mask=other)
        with pytest.raises(NotImplementedError, match="in_mask == out_mask"):
            layer.compact()


# ----------------------------------------------------------------------------- construction


@pytest.mark.parametrize("rank, expected", [(4, 4), (0.25, 2), (0.5, 4), (2.6, 3), (1, 1)])
def test_rank_as_int_or_fraction_matches_sp_adapters(rank, expected):
    layer = SPLoRAConv2d(IN, OUT, 3, rank=rank)
    theirs = sp_adapters.SPLoRAConv2d(IN, OUT, 3, rank=rank)
    assert layer.rank == expected == theirs.adapter.rank
    assert layer.adapter.rows.shape == (1, expected, IN) and layer.adapter.cols.shape == (1, OUT, expected)
    grouped = SPLoRAConv2d(IN, OUT, 3, groups=2, rank=rank)
    assert grouped.adapter.rows.shape == (1, expected, IN // 2)


@pytest.mark.parametrize("kernel_size", [2, 4, (3, 2), (2, 3)])
@pytest.mark.parametrize("cls", [SPLoRAConv2d, SPPaRAConv2d])
def test_even_kernel_size_is_rejected(cls, kernel_size):
    with pytest.raises(ValueError, match="kernel_size"):
        cls(IN, OUT, kernel_size)
    with pytest.raises(ValueError, match="kernel_size"):
        cls.from_module(nn.Conv2d(IN, OUT, kernel_size))


@pytest.mark.parametrize(
    "cls, kwargs, error, argument",
    [
        (SPLoRAConv2d, {"rank": 0}, ValueError, "rank"),
        (SPLoRAConv2d, {"rank": 0.01}, ValueError, "rank"),
        (SPLoRAConv2d, {"rank": "4"}, TypeError, "rank"),
        (SPLoRAConv2d, {"scale": float("nan")}, ValueError, "scale"),
        (SPLoRAConv2d, {"init_range": -1.0}, ValueError, "init_range"),
        (SPPaRAConv2d, {"init_range": -1.0}, ValueError, "init_range"),
        (SPPaRAConv2d, {"backend": "gpu"}, ValueError, "backend"),
        (SPLoRAConv2d, {"padding": "same", "stride": 2}, ValueError, "padding"),
        (SPPaRAConv2d, {"padding_mode": "mirror"}, ValueError, "padding_mode"),
        (SPPaRAConv2d, {"groups": 4}, ValueError, "groups"),
    ],
)
def test_bad_constructor_arguments(cls, kwargs, error, argument):
    with pytest.raises(error, match=argument):
        cls(IN, OUT, 3, **kwargs)


def test_defaults_and_repr(kind):
    cls, _, nd = kind
    layer = cls(IN, OUT, 3)
    assert isinstance(layer, TORCH_CONV[nd])
    assert layer.weight.requires_grad is False and layer.bias.requires_grad
    assert layer.in_mask.dtype == torch.bool and layer.in_mask.shape == (IN,) and layer.out_mask.shape == (OUT,)
    assert layer.in_idx is None and layer.out_idx is None
    adapter = layer.adapter.cols if is_splora(layer) else layer.adapter
    assert 0 < adapter.abs().max() <= 1e-4
    if is_splora(layer):
        assert layer.rank == 16 and layer.scale == 1.0
    assert "active_in=6" in repr(layer)
    double = cls(IN, OUT, 3, 1, 0, 1, 1, False, "zeros", "cpu", torch.float64)
    assert double.bias is None and {p.dtype for p in double.parameters()} == {torch.float64}


def test_sppara_zero_init_range_starts_at_the_base_layer():
    layer = SPPaRAConv2d(IN, OUT, 3, init_range=0)
    assert torch.equal(layer.adapter, torch.zeros_like(layer.adapter))


# ----------------------------------------------------------------------------- sp_adapters interop


def their_layer(theirs_cls, nd: int, **kwargs):
    extra = {"rank": 3} if theirs_cls.__name__.startswith("SPLoRA") else {}
    layer = theirs_cls(IN, OUT, 3, padding=1, **extra, **kwargs)
    with torch.no_grad():
        if hasattr(layer.adapter, "cols"):
            layer.adapter.cols.normal_()
        else:
            layer.adapter.normal_()
        layer.bias.normal_()
    return layer


def test_init_matches_sp_adapters_under_equal_seeds(kind):
    cls, theirs_cls, _ = kind
    extra = {"rank": 5} if cls in SPLORA else {}
    torch.manual_seed(123)
    theirs = theirs_cls(IN, OUT, 3, **extra)
    torch.manual_seed(123)
    ours = cls(IN, OUT, 3, **extra)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_sp_adapters_state_dict_loads_strictly_and_unmasks(kind):
    cls, theirs_cls, nd = kind
    theirs = their_layer(theirs_cls, nd)
    ours = make_layer(cls, padding=1)  # pruned masks that the load must reset
    result = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    assert ours.in_mask.all() and ours.out_mask.all() and ours.in_idx is None and ours.out_idx is None
    x = make_input(ours)
    for mode in (True, False):
        theirs.train(mode)
        ours.train(mode)
        assert_close(ours(x), theirs(x).detach().double(), f"y vs sp_adapters (train={mode})")


def test_state_dict_loads_into_sp_adapters_with_masks_as_the_only_extra_keys(kind):
    cls, theirs_cls, nd = kind
    ours = make_layer(cls, keep=1.0, padding=1)
    extra = {"rank": 3} if cls in SPLORA else {}
    theirs = theirs_cls(IN, OUT, 3, padding=1, **extra)
    with pytest.raises(RuntimeError, match="in_mask"):
        theirs.load_state_dict(ours.state_dict(), strict=True)
    result = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert result.missing_keys == []
    assert sorted(result.unexpected_keys) == ["in_mask", "out_mask"]
    x = make_input(ours)
    assert_close(theirs(x).detach(), ours(x).detach().double(), "sp_adapters vs y")


def test_from_sp_adapters_copies_the_adapter(kind):
    cls, theirs_cls, nd = kind
    theirs = their_layer(theirs_cls, nd, stride=2)
    ours = cls.from_module(theirs)
    assert ours.stride == theirs.stride and ours.padding == theirs.padding
    if is_splora(ours):
        assert ours.rank == 3, "the rank comes from the source adapter"
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    assert ours.weight.requires_grad is False
    x = make_input(ours)
    assert_close(ours(x), theirs(x).detach().double(), "y vs sp_adapters")
    with torch.no_grad():
        assert_close(ours.to_module()(x), theirs.to_module()(x).double(), "to_module vs sp_adapters")


def test_state_dict_round_trip_keeps_masks_and_rebuilds_indices(kind):
    cls, _, _ = kind
    source = make_layer(cls)
    target = cls(IN, OUT, 3, **({"rank": 3} if cls in SPLORA else {}))
    state = source.state_dict()
    target.load_state_dict(state)
    assert torch.equal(target.in_idx, source.in_idx) and torch.equal(target.out_idx, source.out_idx)
    x = make_input(source)
    assert torch.equal(target(x), source(x))
    copied = cls.from_module(source)
    assert torch.equal(copied.out_mask, source.out_mask) and torch.equal(copied(x), source(x))


def test_meta_device_layer_materialised_by_load_state_dict():
    source = make_layer(SPLoRAConv2d)
    for state in (source.state_dict(), sp_adapters.SPLoRAConv2d(IN, OUT, 3, rank=3).state_dict()):
        layer = SPLoRAConv2d(IN, OUT, 3, rank=3, device="meta")
        layer.load_state_dict(state, assign=True)
        assert {t.device.type for t in layer.state_dict().values()} == {"cpu"}
        assert torch.equal(layer.in_mask, state.get("in_mask", torch.ones(IN, dtype=torch.bool)))


@pytest.mark.parametrize(
    "cls, module, error, match",
    [
        (SPLoRAConv2d, nn.Linear(4, 4), TypeError, "module"),
        (SPLoRAConv2d, nn.Conv1d(4, 4, 3), TypeError, "Conv2d"),
        (SPPaRAConv1d, nn.ConvTranspose1d(4, 4, 3), TypeError, "Conv1d"),
        (SPLoRAConv2d, nn.LazyConv2d(4, 3), ValueError, "lazy"),
        (SPLoRAConv2d, SPPaRAConv2d(4, 4, 3), TypeError, "adapter"),
        (SPPaRAConv2d, SPLoRAConv2d(4, 4, 3, rank=2), TypeError, "adapter"),
        (SPPaRAConv2d, sp_adapters.SPLoRAConv2d(4, 4, 3, rank=2), TypeError, "adapter"),
        (SPLoRAConv2d, sp_adapters.SPPaRAConv2d(4, 4, 3), TypeError, "adapter"),
    ],
    ids=["linear", "other-dim", "transposed", "lazy", "sppara-into-splora", "splora-into-sppara",
         "theirs-splora-into-sppara", "theirs-sppara-into-splora"],
)
def test_from_module_rejects_other_layers(cls, module, error, match):
    with pytest.raises(error, match=match):
        cls.from_module(module)


def test_forward_compiles_without_graph_breaks():
    # fullgraph tracing fails on any value read on the host (.item(), nonzero, ...),
    # so this also checks that forward does not synchronise with the device.
    layer = make_layer(SPLoRAConv2d, padding="same", padding_mode="reflect")
    x = make_input(layer)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), layer(x))
