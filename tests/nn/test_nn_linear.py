"""spa_kernels.nn.SPLoRALinear: forward, gradients, masks, conversion, sp_adapters interop.

Every value is checked against an independent dense float64 computation that
applies the masks by multiplication (no index lists), or against sp_adapters.
"""

from __future__ import annotations

import copy

import pytest
import sp_adapters
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import spa_kernels
from spa_kernels.nn import SPLoRALinear

BACKENDS = spa_kernels.backends("cpu")
FP32_TOL = 1e-4  # docs/design.md section 6, relative to the float64 result


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


def random_mask(n: int, keep: float) -> torch.Tensor:
    mask = torch.rand(n) < keep
    mask[torch.randint(n, ())] = True  # at least one active channel
    return mask


def make_layer(in_features=24, out_features=20, rank=4, backend=None, bias=True, keep=0.5, dtype=torch.float32):
    layer = SPLoRALinear(in_features, out_features, bias, dtype=dtype, rank=rank, backend=backend)
    with torch.no_grad():
        # The default init_range (1e-4) would make a wrong adapter term invisible.
        layer.adapter.cols.normal_()
        if bias:
            layer.bias.normal_()
    if keep < 1.0:
        layer.set_masks(random_mask(in_features, keep), random_mask(out_features, keep))
    return layer


def dense_oracle(layer: SPLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """float64 ``((x ∘ m_in) (W + s·B A)ᵀ + b) ∘ m_out``: masks by multiplication, no indices."""
    in_mask = layer.in_mask.double()
    out_mask = layer.out_mask.double()
    w_eff = layer.weight.double() + layer.scale * layer.adapter.cols[0].double() @ layer.adapter.rows[0].double()
    y = (x.double() * in_mask) @ w_eff.t()
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y * out_mask


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


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("lead", [(), (5,), (2, 3)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_dense_oracle(backend, lead, bias):
    layer = make_layer(backend=backend, bias=bias)
    x = torch.randn(*lead, layer.in_features)
    y = layer(x)
    assert_close(y, dense_oracle(layer, x), "y")
    assert (y[..., pruned(layer.out_mask)] == 0).all(), "pruned outputs must be exactly zero"


def test_forward_ignores_pruned_inputs(backend):
    layer = make_layer(backend=backend)
    x = torch.randn(2, 3, layer.in_features)
    x_changed = x.clone()
    x_changed[..., pruned(layer.in_mask)] = 1e6
    assert torch.equal(layer(x), layer(x_changed))


def test_all_channels_pruned(backend):
    layer = make_layer(backend=backend)
    layer.set_masks(torch.zeros(layer.in_features, dtype=torch.bool), torch.zeros(layer.out_features, dtype=torch.bool))
    assert layer.in_idx is not None and layer.in_idx.numel() == 0
    x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    for name, grad in [("x", x.grad), ("rows", layer.adapter.rows.grad),
                       ("cols", layer.adapter.cols.grad), ("bias", layer.bias.grad)]:
        assert grad is None or torch.equal(grad, torch.zeros_like(grad)), name


# ----------------------------------------------------------------------------- gradients


def oracle_gradients(layer: SPLoRALinear, x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """float64 autograd through :func:`dense_oracle` on detached copies of the parameters."""
    twin = copy.deepcopy(layer).double()
    twin.weight.requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    (dense_oracle(twin, x64) * grad_out.double()).sum().backward()
    return {"x": x64.grad, "weight": twin.weight.grad, "rows": twin.adapter.rows.grad,
            "cols": twin.adapter.cols.grad, "bias": twin.bias.grad}


def test_gradients_match_oracle_and_vanish_at_pruned_entries(backend):
    layer = make_layer(backend=backend)
    x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    grad_out = torch.randn(2, 3, layer.out_features)
    layer(x).backward(grad_out)
    expected = oracle_gradients(layer, x, grad_out)
    got = {"x": x.grad, "rows": layer.adapter.rows.grad, "cols": layer.adapter.cols.grad, "bias": layer.bias.grad}
    for name, grad in got.items():
        assert_close(grad, expected[name], f"grad {name}")
    in_off, out_off = pruned(layer.in_mask), pruned(layer.out_mask)
    assert (x.grad[..., in_off] == 0).all()
    assert (layer.adapter.rows.grad[:, :, in_off] == 0).all()
    assert (layer.adapter.cols.grad[:, out_off] == 0).all()
    assert (layer.bias.grad[out_off] == 0).all()
    assert layer.weight.grad is None, "the frozen weight must not get a gradient"
    assert layer.weight.requires_grad is False


@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2d", "3d"])
def test_output_may_be_changed_in_place(backend, lead):
    # An in-place activation after the layer: the op's output must not be a view.
    layer = make_layer(backend=backend)
    x = torch.randn(*lead, layer.in_features, requires_grad=True)
    grad_out = torch.randn(*lead, layer.out_features)
    y = layer(x)
    assert y._base is None
    torch.relu_(y).backward(grad_out)
    x64 = x.detach().double().requires_grad_(True)
    twin = copy.deepcopy(layer).double()
    (torch.relu(dense_oracle(twin, x64)) * grad_out.double()).sum().backward()
    assert_close(x.grad, x64.grad, "grad x through an in-place relu")


def test_masked_fine_tuning_weight_gradient(backend):
    layer = make_layer(backend=backend)
    layer.weight.requires_grad_(True)
    layer.train()
    x = torch.randn(2, 3, layer.in_features)
    grad_out = torch.randn(2, 3, layer.out_features)
    layer(x).backward(grad_out)
    assert layer.weight.requires_grad, "requires_grad=True must be honoured, not reset"
    assert_close(layer.weight.grad, oracle_gradients(layer, x, grad_out)["weight"], "grad weight")
    outside_block = ~(layer.out_mask[:, None] & layer.in_mask[None, :])
    assert (layer.weight.grad[outside_block] == 0).all()


# ----------------------------------------------------------------------------- masks


def test_set_masks_builds_sorted_int64_indices():
    layer = SPLoRALinear(10, 7, rank=2)
    assert layer.in_idx is None and layer.out_idx is None, "all active: the unmasked path"
    in_mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    layer.set_masks(in_mask=in_mask)
    assert layer.in_idx.dtype == torch.int64
    assert layer.in_idx.tolist() == [0, 2, 3, 6, 7, 8]
    assert layer.out_idx is None
    out_mask = torch.tensor([0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    layer.set_masks(out_mask=out_mask)
    assert layer.in_idx.tolist() == [0, 2, 3, 6, 7, 8], "None must keep the other mask"
    assert layer.out_idx.tolist() == [1, 2, 4, 5, 6]
    assert torch.equal(layer.in_mask, in_mask) and torch.equal(layer.out_mask, out_mask)
    layer.set_masks(torch.ones(10, dtype=torch.bool), torch.ones(7, dtype=torch.bool))
    assert layer.in_idx is None and layer.out_idx is None


@pytest.mark.parametrize(
    "kwargs, error, argument",
    [
        ({"in_mask": torch.ones(10, dtype=torch.int64)}, TypeError, "in_mask"),
        ({"out_mask": torch.ones(7)}, TypeError, "out_mask"),
        ({"in_mask": [True] * 10}, TypeError, "in_mask"),
        ({"in_mask": torch.ones(9, dtype=torch.bool)}, ValueError, "in_mask"),
        ({"out_mask": torch.ones(10, dtype=torch.bool)}, ValueError, "out_mask"),
        ({"out_mask": torch.ones(1, 7, dtype=torch.bool)}, ValueError, "out_mask"),
    ],
)
def test_bad_masks_raise_naming_the_argument(kwargs, error, argument):
    layer = SPLoRALinear(10, 7, rank=2)
    with pytest.raises(error, match=argument):
        layer.set_masks(**kwargs)


def test_set_masks_checks_both_before_changing_either():
    layer = SPLoRALinear(10, 7, rank=2)
    with pytest.raises(ValueError, match="out_mask"):
        layer.set_masks(torch.zeros(10, dtype=torch.bool), torch.ones(3, dtype=torch.bool))
    assert layer.in_mask.all() and layer.in_idx is None


def test_masks_and_indices_follow_dtype_changes_and_copies():
    layer = make_layer()
    x = torch.randn(4, layer.in_features, dtype=torch.float64)
    twin = copy.deepcopy(layer).double()
    assert torch.equal(twin.in_idx, layer.in_idx) and torch.equal(twin.out_idx, layer.out_idx)
    assert twin.in_mask.dtype == torch.bool and twin.in_idx.dtype == torch.int64
    assert_close(twin(x), dense_oracle(layer, x), "y float64")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_indices_move_with_the_module_and_forward_does_not_sync():
    layer = make_layer().cuda()
    assert layer.in_idx.is_cuda and layer.out_idx.is_cuda and layer.in_mask.is_cuda
    x = torch.randn(2, 3, layer.in_features, device="cuda")
    layer(x)  # warm up: lazy initialisation may synchronise once
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_close(y.cpu(), dense_oracle(layer.cpu(), x.cpu()), "y cuda")


def test_forward_compiles_without_graph_breaks(backend):
    # fullgraph tracing fails on any value read on the host (.item(), nonzero, ...),
    # so this also checks that forward does not synchronise with the device.
    if backend == "triton":
        pytest.skip("compiling around the Triton interpreter is slow; the op is opaque anyway")
    layer = make_layer(backend=backend)
    x = torch.randn(2, 3, layer.in_features)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), layer(x))


# ----------------------------------------------------------------------------- construction


@pytest.mark.parametrize("out_features, rank, expected", [(20, 4, 4), (20, 0.25, 5), (20, 0.1, 2),
                                                          (7, 0.5, 4), (20, 2.6, 3), (20, 1, 1)])
def test_rank_as_int_or_fraction_matches_sp_adapters(out_features, rank, expected):
    layer = SPLoRALinear(12, out_features, rank=rank)
    theirs = sp_adapters.SPLoRALinear(12, out_features, rank=rank)
    print(f"rank={rank}: ours {layer.rank}, sp_adapters {theirs.adapter.rank}")
    assert layer.rank == expected == theirs.adapter.rank
    assert layer.adapter.rows.shape == (1, expected, 12)
    assert layer.adapter.cols.shape == (1, out_features, expected)


@pytest.mark.parametrize(
    "kwargs, error, argument",
    [
        ({"rank": 0}, ValueError, "rank"),
        ({"rank": -3}, ValueError, "rank"),
        ({"rank": 0.01}, ValueError, "rank"),  # rounds to rank 0 for 20 outputs
        ({"rank": True}, TypeError, "rank"),
        ({"rank": "4"}, TypeError, "rank"),
        ({"scale": "1"}, TypeError, "scale"),
        ({"scale": float("nan")}, ValueError, "scale"),
        ({"init_range": -1.0}, ValueError, "init_range"),
        ({"backend": "gpu"}, ValueError, "backend"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, argument):
    with pytest.raises(error, match=argument):
        SPLoRALinear(12, 20, **kwargs)


def test_init_matches_sp_adapters_under_equal_seeds():
    torch.manual_seed(123)
    theirs = sp_adapters.SPLoRALinear(24, 20, rank=5)
    torch.manual_seed(123)
    ours = SPLoRALinear(24, 20, rank=5)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    assert ours.weight.requires_grad is False and ours.bias.requires_grad
    assert ours.adapter.cols.abs().max() <= 1e-4
    assert ours.in_mask.all() and ours.out_mask.all()


def test_constructor_device_dtype_and_no_bias():
    layer = SPLoRALinear(6, 5, False, "cpu", torch.float64, rank=2)
    assert layer.bias is None and "bias" not in layer.state_dict()
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    assert isinstance(layer, nn.Linear)
    assert "rank=2" in repr(layer)


# ----------------------------------------------------------------------------- state dicts


def test_sp_adapters_state_dict_loads_strictly_and_unmasks():
    theirs = sp_adapters.SPLoRALinear(24, 20, rank=4)
    with torch.no_grad():
        theirs.adapter.cols.normal_()
    ours = make_layer(rank=4)  # pruned masks that the load must reset
    result = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    assert ours.in_mask.all() and ours.out_mask.all()
    assert ours.in_idx is None and ours.out_idx is None
    x = torch.randn(2, 3, 24)
    for mode in (True, False):  # sp_adapters computes differently in train and eval
        theirs.train(mode)
        assert_close(ours(x), theirs(x).detach().double(), f"y vs sp_adapters (train={mode})")


def test_state_dict_loads_into_sp_adapters_with_masks_as_the_only_extra_keys():
    ours = make_layer(rank=4, keep=1.0)
    theirs = sp_adapters.SPLoRALinear(24, 20, rank=4)
    with pytest.raises(RuntimeError, match="in_mask"):
        theirs.load_state_dict(ours.state_dict(), strict=True)
    result = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert result.missing_keys == []
    assert sorted(result.unexpected_keys) == ["in_mask", "out_mask"]
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    x = torch.randn(2, 3, 24)
    assert_close(theirs(x).detach(), ours(x).detach().double(), "sp_adapters vs y")


def test_state_dict_round_trip_keeps_masks_and_rebuilds_indices(backend):
    source = make_layer(backend=backend)
    target = SPLoRALinear(24, 20, rank=4, backend=backend)
    state = source.state_dict()
    assert set(state) == {"weight", "bias", "adapter.rows", "adapter.cols", "in_mask", "out_mask"}
    target.load_state_dict(state)
    assert torch.equal(target.in_idx, source.in_idx) and torch.equal(target.out_idx, source.out_idx)
    x = torch.randn(2, 3, 24)
    assert torch.equal(target(x), source(x))


def test_nested_sp_adapters_state_dict_loads_under_a_prefix():
    theirs = nn.Sequential(nn.ReLU(), sp_adapters.SPLoRALinear(8, 6, rank=2))
    ours = nn.Sequential(nn.ReLU(), SPLoRALinear(8, 6, rank=2))
    ours[1].set_masks(out_mask=torch.tensor([1, 0, 1, 0, 1, 1], dtype=torch.bool))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours[1].out_mask.all() and ours[1].out_idx is None


# ----------------------------------------------------------------------------- from_module


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_copies_weight_and_bias(dtype, bias):
    source = nn.Linear(12, 9, bias=bias, dtype=dtype).eval()
    layer = SPLoRALinear.from_module(source, rank=0.5, init_range=1e-3)
    assert layer.weight.dtype == dtype and layer.weight.device == source.weight.device
    assert torch.equal(layer.weight, source.weight)
    assert layer.weight.data_ptr() != source.weight.data_ptr(), "the weight must be copied, not shared"
    assert layer.weight.requires_grad is False
    assert (layer.bias is None) == (not bias)
    if bias:
        assert torch.equal(layer.bias, source.bias) and layer.bias.requires_grad
    assert layer.rank == 4 and layer.adapter.cols.abs().max() <= 1e-3
    assert layer.training is False


def test_from_sp_adapters_copies_the_adapter_and_its_rank(backend):
    theirs = sp_adapters.SPLoRALinear(24, 20, rank=3)
    with torch.no_grad():
        theirs.adapter.cols.normal_()
    layer = SPLoRALinear.from_module(theirs, rank=7, backend=backend)
    assert layer.rank == 3, "the rank comes from the source adapter"
    for key, value in theirs.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key
    x = torch.randn(2, 3, 24)
    assert_close(layer(x), theirs(x).detach().double(), "y vs sp_adapters")


def test_from_own_layer_copies_adapter_and_masks():
    source = make_layer()
    layer = SPLoRALinear.from_module(source)
    assert torch.equal(layer.adapter.cols, source.adapter.cols) and torch.equal(layer.out_mask, source.out_mask)
    x = torch.randn(3, source.in_features)
    assert torch.equal(layer(x), source(x))


def test_from_module_rejects_other_layers():
    with pytest.raises(TypeError, match="module"):
        SPLoRALinear.from_module(nn.Conv1d(3, 4, 1))
    with pytest.raises(ValueError, match="lazy"):
        SPLoRALinear.from_module(nn.LazyLinear(4))


# ----------------------------------------------------------------------------- train, merge, compact


def test_train_step_then_merge_and_compact(backend):
    source = nn.Linear(24, 20)
    layer = SPLoRALinear.from_module(source, rank=4, backend=backend)
    in_mask, out_mask = random_mask(24, 0.6), random_mask(20, 0.6)
    layer.set_masks(in_mask, out_mask)
    before = copy.deepcopy(layer)
    trainable = [p for p in layer.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(layer.adapter.rows), id(layer.adapter.cols), id(layer.bias)}
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    x = torch.randn(2, 5, 24)
    layer(x).square().mean().backward()
    optimizer.step()

    assert torch.equal(layer.weight, source.weight), "the frozen weight must not move"
    assert not torch.equal(layer.adapter.cols, before.adapter.cols), "the step must change the adapter"
    in_off, out_off = pruned(in_mask), pruned(out_mask)
    assert torch.equal(layer.adapter.rows[:, :, in_off], before.adapter.rows[:, :, in_off])
    assert torch.equal(layer.adapter.cols[:, out_off], before.adapter.cols[:, out_off])
    assert torch.equal(layer.bias[out_off], before.bias[out_off])

    with torch.no_grad():
        y = layer(x)
        expected = dense_oracle(layer, x)
        assert_close(y, expected, "y after step")
        merged = layer.to_module()
        assert type(merged) is nn.Linear and merged.weight.shape == (20, 24)
        assert_close(merged(x), expected, "to_module()(x)")
        assert (merged(x)[..., out_off] == 0).all()
        w_eff = layer.weight.double() + layer.adapter.cols[0].double() @ layer.adapter.rows[0].double()
        assert_close(merged.weight, w_eff * (out_mask[:, None] & in_mask[None, :]), "to_module weight")
        assert (merged.bias[out_off] == 0).all()

        small = layer.compact()
        active_in, active_out = in_mask.nonzero().flatten(), out_mask.nonzero().flatten()
        assert small.weight.shape == (len(active_out), len(active_in))
        assert_close(small(x[..., active_in]), expected[..., active_out], "compact()(x[..., S])")
        assert torch.equal(small.bias, layer.bias[active_out])


@pytest.mark.parametrize("masked", ["none", "in", "out", "both"])
@pytest.mark.parametrize("bias", [True, False])
def test_to_module_and_compact_for_every_mask_combination(masked, bias):
    layer = make_layer(bias=bias, keep=1.0, rank=3)
    layer.scale = 0.5
    in_mask = random_mask(24, 0.5) if masked in ("in", "both") else torch.ones(24, dtype=torch.bool)
    out_mask = random_mask(20, 0.5) if masked in ("out", "both") else torch.ones(20, dtype=torch.bool)
    layer.set_masks(in_mask, out_mask)
    x = torch.randn(7, 24)
    expected = dense_oracle(layer, x)
    with torch.no_grad():
        assert_close(layer.to_module()(x), expected, "to_module()(x)")
        small = layer.compact()
        assert (small.bias is None) == (not bias)
        assert_close(small(x[:, in_mask]), expected[:, out_mask], "compact()(x[:, S])")
    assert small.weight.requires_grad and small.weight.grad_fn is None


def test_to_module_does_not_alias_the_layer():
    layer = make_layer(keep=1.0)
    merged = layer.to_module()
    with torch.no_grad():
        merged.bias.zero_()
    assert layer.bias.abs().sum() > 0


# ----------------------------------------------------------------------------- random cases


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
@pytest.mark.parametrize("backend_name", [b for b in BACKENDS if b != "triton"])
def test_random_shapes_and_masks(backend_name, data):
    in_features = data.draw(st.integers(1, 40), label="in")
    out_features = data.draw(st.integers(1, 40), label="out")
    rank = data.draw(st.integers(1, 12), label="rank")
    rows = data.draw(st.integers(1, 9), label="rows")
    in_mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=in_features, max_size=in_features)))
    out_mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=out_features, max_size=out_features)))
    scale = data.draw(st.sampled_from([1.0, 0.5, -2.0]), label="scale")
    layer = SPLoRALinear(in_features, out_features, rank=rank, scale=scale, backend=backend_name)
    with torch.no_grad():
        layer.adapter.cols.normal_()
    layer.set_masks(in_mask, out_mask)
    x = torch.randn(rows, in_features)
    y = layer(x)
    assert_close(y, dense_oracle(layer, x), "y")
    assert (y[:, ~out_mask] == 0).all()
    with torch.no_grad():
        assert_close(layer.to_module()(x), dense_oracle(layer, x), "to_module()(x)")


def test_meta_device_layer_materialised_by_load_state_dict():
    source = make_layer()
    for state in (source.state_dict(), sp_adapters.SPLoRALinear(24, 20, rank=4).state_dict()):
        layer = SPLoRALinear(24, 20, rank=4, device="meta")
        layer.load_state_dict(state, assign=True)
        assert {t.device.type for t in layer.state_dict().values()} == {"cpu"}
        assert torch.equal(layer.in_mask, state.get("in_mask", torch.ones(24, dtype=torch.bool)))
    x = torch.randn(3, 24)
    layer = SPLoRALinear(24, 20, rank=4, device="meta").to_empty(device="cpu")
    layer.load_state_dict(source.state_dict())
    assert torch.equal(layer(x), source(x))
