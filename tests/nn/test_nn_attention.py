"""spa_kernels.nn.SPLoRAMultiheadAttention: torch parity, head pruning, sp_adapters interop.

Unpruned layers with a zero adapter are checked against ``nn.MultiheadAttention``;
pruned layers with non-zero adapters against a float64 oracle that applies every
mask by multiplication (the dense model with pruned heads' outputs zeroed).
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import sp_adapters
import torch
import torch.nn.functional as F
from torch import nn

import spa_kernels
from spa_kernels.nn import SPLoRALinear, SPLoRAMultiheadAttention

BACKENDS = spa_kernels.backends("cpu")
FP32_TOL = 1e-4
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = FP32_TOL) -> None:
    """``actual`` within ``tol`` of ``expected``, relative to its largest entry."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs()
    ref = expected.double().abs().max().item() if expected.numel() else 0.0
    max_err = err.max().item() if err.numel() else 0.0
    where = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape)) if err.numel() else ()
    print(f"{what}: max abs error {max_err:.3e} at {where}, max |expected| {ref:.3e}")
    assert max_err <= tol * max(ref, 1.0), f"{what}: max abs error {max_err:.3e} at {where}"


def randomise_adapters(layer: nn.Module) -> None:
    """Non-zero adapters and biases: the default init would hide a wrong adapter term."""
    with torch.no_grad():
        for name in PROJECTIONS:
            getattr(layer, name).adapter.cols.normal_(std=0.3)
        for p in (layer.in_proj_bias, layer.out_proj.bias):
            if p is not None:
                p.normal_()


def torch_pair(embed=16, heads=4, kdim=None, vdim=None, batch_first=False, bias=True, backend=None, extras=(False, False)):
    base = nn.MultiheadAttention(embed, heads, bias=bias, add_bias_kv=extras[0], add_zero_attn=extras[1],
                                 kdim=kdim, vdim=vdim, batch_first=batch_first)
    with torch.no_grad():
        for p in (base.in_proj_bias, base.out_proj.bias):
            if p is not None:
                p.normal_()
    ours = SPLoRAMultiheadAttention.from_module(base, rank=3, backend=backend)
    with torch.no_grad():
        for name in PROJECTIONS:
            getattr(ours, name).adapter.cols.zero_()
    return base, ours


def inputs(layer, batch=3, target=5, source=7, batched=True):
    def make(length, width):
        if not batched:
            return torch.randn(length, width)
        return torch.randn(batch, length, width) if layer.batch_first else torch.randn(length, batch, width)

    query = make(target, layer.embed_dim)
    if layer.kdim == layer.embed_dim and layer.vdim == layer.embed_dim and target == source:
        return query, query, query
    return query, make(source, layer.kdim), make(source, layer.vdim)


# ----------------------------------------------------------------------------- parity with torch


def attention_masks(kind, batch, heads, target, source, batched):
    """(key_padding_mask, attn_mask, is_causal) for a mask ``kind``; no row fully masked."""
    lead = (batch,) if batched else ()
    padding = torch.rand(*lead, source) < 0.3
    padding[..., 0] = False
    blocked = torch.rand(target, source) < 0.3
    blocked[:, 0] = False
    per_head = torch.randn((batch if batched else 1) * heads, target, source)
    causal = torch.ones(target, source, dtype=torch.bool).triu(1)
    return {
        "none": (None, None, False),
        "bool_attn": (None, blocked, False),
        "float_attn_3d": (None, per_head, False),
        "bool_padding": (padding, None, False),
        "bool_both": (padding, blocked, False),
        "float_both": (torch.zeros(padding.shape).masked_fill(padding, -1e4), per_head, False),
        "causal": (None, causal, True),
        "causal_padding": (padding, causal, True),
    }[kind]


MASK_KINDS = ("none", "bool_attn", "float_attn_3d", "bool_padding", "bool_both", "float_both", "causal",
              "causal_padding")


# Every layout, key/value width and batching without appended keys; the appended keys
# (add_bias_kv, add_zero_attn) with batched self-attention in both layouts.
TORCH_CASES = [
    *itertools.product((False, True), ((None, None), (6, 10)), (True, False), [(False, False)]),
    *itertools.product((False, True), [(None, None)], [True], [(True, False), (False, True), (True, True)]),
]


@pytest.mark.parametrize("batch_first, dims, batched, extras", TORCH_CASES)
def test_matches_torch_for_every_argument_combination(batch_first, dims, batched, extras):
    kdim, vdim = dims
    base, ours = torch_pair(kdim=kdim, vdim=vdim, batch_first=batch_first, extras=extras)
    target, source = (5, 5) if kdim is None else (5, 7)
    query, key, value = inputs(ours, target=target, source=source, batched=batched)
    for kind, need_weights, average in itertools.product(MASK_KINDS, (True, False), (True, False)):
        padding, attn_mask, is_causal = attention_masks(kind, 3, 4, target, source, batched)
        if not batched and attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask[:4]
        kwargs = dict(key_padding_mask=padding, attn_mask=attn_mask, is_causal=is_causal,
                      need_weights=need_weights, average_attn_weights=average)
        expected, expected_weights = base(query, key, value, **kwargs)
        actual, weights = ours(query, key, value, **kwargs)
        what = f"{kind}, need_weights={need_weights}, average={average}"
        assert_close(actual, expected, f"output ({what})")
        assert actual.is_contiguous(), "the output should be contiguous in the caller's layout"
        if need_weights:
            assert_close(weights, expected_weights, f"weights ({what})")
        else:
            assert weights is None and expected_weights is None


def test_gradients_match_torch(backend):
    base, ours = torch_pair(backend=backend)
    query = torch.randn(5, 3, 16, requires_grad=True)
    padding, attn_mask, _ = attention_masks("bool_both", 3, 4, 5, 5, True)
    for need_weights in (True, False):
        query.grad = None
        base.zero_grad()
        ours.zero_grad()
        outputs = []
        for layer in (base, ours):
            out, _ = layer(query, query, query, key_padding_mask=padding, attn_mask=attn_mask,
                           need_weights=need_weights)
            (grad_query,) = torch.autograd.grad(out.square().sum(), query)
            outputs.append((out, grad_query))
        assert_close(outputs[1][0], outputs[0][0], "output")
        assert_close(outputs[1][1], outputs[0][1], "d query")


def test_eval_no_grad_and_train_agree_without_dropout():
    _, ours = torch_pair(batch_first=True)
    randomise_adapters(ours)
    query = torch.randn(2, 5, 16)
    train_out = ours(query, query, query)[0]
    ours.eval()
    with torch.inference_mode():
        eval_out = ours(query, query, query)[0]
    assert_close(eval_out, train_out, "eval vs train")


def test_autocast_error_is_no_worse_than_torch():
    base, ours = torch_pair(batch_first=True)
    query = torch.randn(2, 5, 16)
    for need_weights in (True, False):
        expected = base(query, query, query, need_weights=need_weights)[0].double()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch_out = base(query, query, query, need_weights=need_weights)[0]
            ours_out = ours(query, query, query, need_weights=need_weights)[0]
        torch_error = (torch_out.double() - expected).abs().max().item()
        ours_error = (ours_out.double() - expected).abs().max().item()
        print(f"need_weights={need_weights}: bf16 autocast error ours {ours_error:.3e}, torch {torch_error:.3e}")
        assert ours_error <= 2 * torch_error


def test_dropout_applies_in_training_only():
    _, ours = torch_pair(batch_first=True)
    ours.dropout = 0.5
    query = torch.randn(2, 5, 16)
    weights = ours(query, query, query, average_attn_weights=False)[1]
    assert (weights == 0).any(), "dropout left every attention weight in place"
    ours.eval()
    weights = ours(query, query, query, average_attn_weights=False)[1]
    assert_close(weights.sum(-1), torch.ones(2, 4, 5), "eval weights sum to one")


# ----------------------------------------------------------------------------- head pruning oracle


def make_pruned(backend=None, kdim=None, vdim=None, batch_first=True, bias=True, heads=4, head_mask=None,
                extras=(False, False)):
    layer = SPLoRAMultiheadAttention(16, heads, bias=bias, add_bias_kv=extras[0], add_zero_attn=extras[1],
                                     kdim=kdim, vdim=vdim, batch_first=batch_first, rank=3, backend=backend)
    randomise_adapters(layer)
    if head_mask is None:
        head_mask = torch.tensor([True, False, True, True][:heads] if heads == 4 else [True] * heads)
    in_mask = torch.rand(16) < 0.7
    in_mask[0] = True
    out_mask = torch.rand(16) < 0.7
    out_mask[0] = True
    key_in_mask = None if kdim is None else torch.arange(kdim) % 3 != 1
    layer.set_masks(head_mask=head_mask, in_mask=in_mask, out_mask=out_mask, key_in_mask=key_in_mask)
    return layer


def oracle(layer, query, key, value, key_padding_mask=None, attn_mask=None):
    """float64 dense attention; masks multiply weights, pruned heads' outputs are zeroed.

    Returns the output and the per-head weights ``(N, H, L, S)`` (batch first).
    """
    def effective(proj, rows=None, cols=None):
        w = proj.weight.double() + proj.scale * proj.adapter.cols[0].double() @ proj.adapter.rows[0].double()
        w = w * proj.out_mask.double()[:, None] * proj.in_mask.double()[None, :]
        if rows is not None:
            w = w * rows.double()[:, None]
        if cols is not None:
            w = w * cols.double()[None, :]
        return w

    heads, d = layer.num_heads, layer.head_dim
    head_channels = layer.head_mask.repeat_interleave(d)
    if not layer.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    query, key, value = query.double(), key.double(), value.double()
    biases = [None] * 3 if layer.in_proj_bias is None else layer.in_proj_bias.double().chunk(3)
    projected = []
    for proj, x, b in zip((layer.q_proj, layer.k_proj, layer.v_proj), (query, key, value), biases, strict=True):
        y = x @ effective(proj, rows=head_channels).t()
        if b is not None:
            y = y + b * (proj.out_mask & head_channels).double()
        projected.append(y)
    q, k, v = projected
    batch, source = k.shape[0], k.shape[1]
    if layer.bias_k is not None:  # one more key/value per sequence
        k = torch.cat([k, layer.bias_k.double().expand(batch, 1, -1)], dim=1)
        v = torch.cat([v, layer.bias_v.double().expand(batch, 1, -1)], dim=1)
    if layer.add_zero_attn:
        k, v = (torch.cat([t, t.new_zeros(batch, 1, t.shape[2])], dim=1) for t in (k, v))
    extra = k.shape[1] - source
    q, k, v = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)
    if attn_mask is not None:
        add = attn_mask.double() if attn_mask.is_floating_point() else attn_mask.double() * -1e300
        add = F.pad(add if add.dim() == 2 else add.view(batch, heads, -1, source), (0, extra))
        scores = scores + add
    if key_padding_mask is not None:
        add = key_padding_mask.double()
        add = add if key_padding_mask.is_floating_point() else add * -1e300
        scores = scores + F.pad(add, (0, extra))[:, None, None, :]
    weights = torch.softmax(scores, dim=-1)
    heads_out = (weights @ v) * layer.head_mask.double()[None, :, None, None]
    concat = heads_out.transpose(1, 2).flatten(2)
    out = concat @ effective(layer.out_proj, cols=head_channels).t()
    if layer.out_proj.bias is not None:
        out = out + layer.out_proj.bias.double() * layer.out_proj.out_mask.double()
    if not layer.batch_first:
        out = out.transpose(0, 1)
    return out, weights * layer.head_mask.double()[None, :, None, None]


def trainable(layer):
    return {name: p for name, p in layer.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("case", ["self", "cross_kv_dims", "seq_first_no_bias", "bias_kv_zero_attn"])
def test_pruned_heads_match_the_dense_oracle_forward_and_every_gradient(backend, need_weights, case):
    config = {
        "self": dict(),
        "cross_kv_dims": dict(kdim=6, vdim=10),
        "seq_first_no_bias": dict(batch_first=False, bias=False),
        "bias_kv_zero_attn": dict(extras=(True, True)),
    }[case]
    layer = make_pruned(backend=backend, **config)
    query, key, value = inputs(layer, batch=2, target=5, source=5 if case != "cross_kv_dims" else 6)
    query, key, value = (t.clone().requires_grad_() for t in (query, key, value))
    source = key.shape[1] if layer.batch_first else key.shape[0]
    kind = "float_both" if case == "seq_first_no_bias" else "bool_both"
    padding, attn_mask, _ = attention_masks(kind, 2, 4, 5, source, True)

    out, weights = layer(query, key, value, key_padding_mask=padding, attn_mask=attn_mask,
                         need_weights=need_weights, average_attn_weights=False)
    params = trainable(layer)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [query, key, value, *params.values()], grad_out, allow_unused=False)

    double_layer = copy.deepcopy(layer).double()
    leaves = trainable(double_layer)
    double_inputs = [t.detach().double().requires_grad_() for t in (query, key, value)]
    expected, expected_weights = oracle(double_layer, *double_inputs, key_padding_mask=padding, attn_mask=attn_mask)
    expected_grads = torch.autograd.grad(expected, [*double_inputs, *leaves.values()], grad_out.double())

    assert_close(out, expected, "output")
    if need_weights:
        assert_close(weights, expected_weights, "per-head weights")
    names = ["query", "key", "value", *params]
    for name, actual, wanted in zip(names, grads, expected_grads, strict=True):
        assert_close(actual, wanted, f"d {name}")

    # Exactly zero, not merely small, wherever a pruned head or channel is involved.
    by_name = dict(zip(names, grads, strict=True))
    pruned_channels = (~layer.head_mask).repeat_interleave(layer.head_dim)
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert torch.all(by_name[f"{proj}.adapter.cols"][0][pruned_channels] == 0), proj
        pruned_inputs = ~getattr(layer, proj).in_mask
        assert torch.all(by_name[f"{proj}.adapter.rows"][0][:, pruned_inputs] == 0), proj
    if layer.in_proj_bias is not None:
        assert torch.all(by_name["in_proj_bias"][pruned_channels.repeat(3)] == 0)
        assert torch.all(by_name["out_proj.bias"][~layer.out_proj.out_mask] == 0)
    assert torch.all(by_name["out_proj.adapter.rows"][0][:, pruned_channels] == 0)
    assert torch.all(by_name["out_proj.adapter.cols"][0][~layer.out_proj.out_mask] == 0)
    if layer.bias_k is not None:
        assert torch.all(by_name["bias_k"][..., pruned_channels] == 0)
        assert torch.all(by_name["bias_v"][..., pruned_channels] == 0)
    assert torch.all(by_name["query"][..., ~layer.q_proj.in_mask] == 0)


@pytest.mark.parametrize("need_weights", [True, False])
def test_gradcheck_float64_with_pruned_heads(need_weights):
    layer = make_pruned(backend="reference", kdim=6, vdim=10, extras=(True, False)).double()
    query = torch.randn(1, 2, 16, dtype=torch.float64, requires_grad=True)
    key = torch.randn(1, 3, 6, dtype=torch.float64, requires_grad=True)
    value = torch.randn(1, 3, 10, dtype=torch.float64, requires_grad=True)

    def attend(query, key, value):
        out, weights = layer(query, key, value, need_weights=need_weights, average_attn_weights=False)
        return out if weights is None else (out, weights)

    assert torch.autograd.gradcheck(attend, (query, key, value))


def test_pruned_weights_are_zero_and_average_is_over_active_heads():
    layer = make_pruned()
    query = torch.randn(2, 5, 16)
    _, per_head = layer(query, query, query, average_attn_weights=False)
    _, average = layer(query, query, query)
    assert torch.all(per_head[:, 1] == 0)
    active = per_head[:, layer.head_mask]
    assert_close(average, active.mean(dim=1), "average over active heads")
    assert_close(average.sum(-1), torch.ones(2, 5), "rows sum to one")


def test_masked_weight_fine_tuning_gradient_is_zero_at_pruned_heads():
    layer = make_pruned()
    layer.q_proj.weight.requires_grad_(True)
    layer.out_proj.weight.requires_grad_(True)
    query = torch.randn(2, 5, 16)
    layer(query, query, query, need_weights=False)[0].square().sum().backward()
    pruned_channels = (~layer.head_mask).repeat_interleave(layer.head_dim)
    assert torch.all(layer.q_proj.weight.grad[pruned_channels] == 0)
    assert torch.all(layer.out_proj.weight.grad[:, pruned_channels] == 0)
    assert layer.q_proj.weight.grad[~pruned_channels].abs().sum() > 0


def test_every_head_pruned_gives_the_output_bias(backend):
    layer = make_pruned(backend=backend, head_mask=torch.zeros(4, dtype=torch.bool))
    query = torch.randn(2, 5, 16)
    for need_weights in (True, False):
        out, weights = layer(query, query, query, need_weights=need_weights)
        expected = (layer.out_proj.bias * layer.out_proj.out_mask).expand(2, 5, 16)
        assert torch.equal(out, expected)
    _, weights = layer(query, query, query)
    assert torch.equal(weights, torch.zeros(2, 5, 5))


def test_core_runs_on_active_heads_only(monkeypatch):
    layer = make_pruned(heads=8, head_mask=torch.tensor([True, False, False, True, False, False, False, True]))
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        seen.append((q.shape[1], k.shape[1], v.shape[1]))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    query = torch.randn(2, 5, 16)
    layer(query, query, query, need_weights=False)
    assert seen == [(3, 3, 3)]
    active_channels = layer.head_mask.repeat_interleave(2).nonzero().flatten()
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(layer, proj).out_idx, active_channels)
    assert torch.equal(layer.out_proj.in_idx, active_channels)


def test_masks_that_change_are_followed(backend):
    layer = make_pruned(backend=backend)
    query = torch.randn(2, 5, 16)
    for head_mask in ([True, True, False, False], [False, True, True, True], [True] * 4):
        layer.set_masks(head_mask=torch.tensor(head_mask))
        assert_close(layer(query, query, query)[0], oracle(layer, query, query, query)[0], f"heads {head_mask}")
    assert layer.head_idx is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_head_indices_move_with_the_module_and_forward_does_not_sync():
    layer = make_pruned(extras=(True, True)).cuda()
    assert layer.head_idx.is_cuda and layer.q_proj.out_idx.is_cuda
    query = torch.randn(2, 5, 16, device="cuda")
    padding = torch.zeros(2, 5, dtype=torch.bool, device="cuda")
    for need_weights in (True, False):
        layer(query, query, query, key_padding_mask=padding, need_weights=need_weights)  # warm up
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = layer(query, query, query, key_padding_mask=padding, need_weights=need_weights)[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        expected = oracle(layer.cpu(), query.cpu(), query.cpu(), query.cpu(), key_padding_mask=padding.cpu())[0]
        assert_close(out.cpu(), expected, f"cuda output (need_weights={need_weights})")
        layer.cuda()


def test_finer_channel_masks_inside_active_heads_are_honoured():
    layer = make_pruned()
    for proj, channel in (("q_proj", 1), ("v_proj", 9)):  # channels of active heads 0 and 2
        inside = getattr(layer, proj).out_mask.clone()
        inside[channel] = False
        getattr(layer, proj).set_masks(out_mask=inside)
    query = torch.randn(2, 5, 16)
    assert_close(layer(query, query, query)[0], oracle(layer, query, query, query)[0], "channel-pruned heads")


# ----------------------------------------------------------------------------- sp_adapters interop


@pytest.mark.parametrize("dims, bias_kv", [((None, None), False), ((6, 10), False), ((None, None), True)],
                         ids=["self", "kv_dims", "bias_kv"])
def test_sp_adapters_state_dict_loads_strictly(dims, bias_kv):
    kdim, vdim = dims
    theirs = sp_adapters.SPLoRAMultiheadAttention(16, 4, add_bias_kv=bias_kv, kdim=kdim, vdim=vdim, rank=3)
    randomise_adapters(theirs)
    ours = SPLoRAMultiheadAttention(16, 4, add_bias_kv=bias_kv, kdim=kdim, vdim=vdim, rank=3)
    ours.set_masks(head_mask=torch.tensor([True, False, True, True]))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.head_idx is None and bool(ours.head_mask.all())
    query, key, value = inputs(ours, source=5 if kdim is None else 7)
    for mode in (True, False):
        ours.train(mode)
        theirs.train(mode)
        with torch.no_grad():
            assert_close(ours(query, key, value)[0], theirs(query, key, value)[0], f"output (train={mode})")


def test_state_dict_loads_into_sp_adapters_with_masks_as_the_only_extra_keys():
    ours = SPLoRAMultiheadAttention(16, 4, rank=3)
    randomise_adapters(ours)
    theirs = sp_adapters.SPLoRAMultiheadAttention(16, 4, rank=3)
    result = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert result.missing_keys == []
    expected_extra = {"head_mask"} | {f"{p}.{m}" for p in PROJECTIONS for m in ("in_mask", "out_mask")}
    assert set(result.unexpected_keys) == expected_extra
    query = torch.randn(5, 2, 16)
    with torch.no_grad():
        assert_close(theirs(query, query, query)[0], ours(query, query, query)[0], "sp_adapters vs ours")


def test_init_matches_sp_adapters_under_equal_seeds():
    torch.manual_seed(3)
    theirs = sp_adapters.SPLoRAMultiheadAttention(16, 4, rank=3)
    torch.manual_seed(3)
    ours = SPLoRAMultiheadAttention(16, 4, rank=3)
    mine = ours.state_dict()
    for name, value in theirs.state_dict().items():
        assert torch.equal(mine[name], value), name


def test_from_sp_adapters_copies_adapters_and_rank(backend):
    theirs = sp_adapters.SPLoRAMultiheadAttention(16, 4, rank=3, batch_first=True)
    randomise_adapters(theirs)
    ours = SPLoRAMultiheadAttention.from_module(theirs, rank=7, backend=backend)
    assert ours.rank == 3 and ours.batch_first
    query = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert_close(ours(query, query, query)[0], theirs(query, query, query)[0], "from sp_adapters")


def test_state_dict_round_trip_keeps_head_mask():
    source = make_pruned()
    copy = SPLoRAMultiheadAttention(16, 4, batch_first=True, rank=3)
    copy.load_state_dict(source.state_dict(), strict=True)
    assert torch.equal(copy.head_idx, source.head_idx)
    query = torch.randn(2, 5, 16)
    assert torch.equal(copy(query, query, query)[0], source(query, query, query)[0])


# ----------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("dims, extras", [((None, None), (False, False)), ((6, 10), (False, False)),
                                          ((None, None), (True, True))], ids=["self", "kv_dims", "bias_kv_zero_attn"])
def test_from_module_then_to_module_round_trip(dims, extras):
    kdim, vdim = dims
    base = nn.MultiheadAttention(16, 4, add_bias_kv=extras[0], add_zero_attn=extras[1], kdim=kdim, vdim=vdim,
                                 batch_first=True)
    ours = SPLoRAMultiheadAttention.from_module(base, rank=2)
    randomise_adapters(ours)
    query, key, value = inputs(ours, source=5 if kdim is None else 7)
    merged = ours.to_module()
    assert type(merged) is nn.MultiheadAttention and merged._qkv_same_embed_dim == (kdim is None)
    for need_weights in (True, False):
        expected = ours(query, key, value, need_weights=need_weights)
        actual = merged(query, key, value, need_weights=need_weights)
        assert_close(actual[0], expected[0], "unpruned output")
        if need_weights:
            assert_close(actual[1], expected[1], "unpruned weights")
    ours.set_masks(head_mask=torch.tensor([False, True, True, False]), out_mask=torch.arange(16) % 5 != 0,
                   in_mask=torch.arange(16) % 4 != 2)
    merged = ours.to_module()
    assert_close(merged(query, key, value, need_weights=False)[0], ours(query, key, value, need_weights=False)[0],
                 "pruned output")
    again = SPLoRAMultiheadAttention.from_module(ours)
    assert torch.equal(again.head_mask, ours.head_mask) and again.rank == ours.rank
    assert torch.equal(again(query, key, value)[0], ours(query, key, value)[0])


def test_from_module_keeps_dtype_and_training_mode_and_checks_its_argument():
    base = nn.MultiheadAttention(8, 2, dtype=torch.float64).eval()
    ours = SPLoRAMultiheadAttention.from_module(base)
    assert ours.q_proj.weight.dtype == torch.float64 and not ours.training
    assert not ours.q_proj.weight.requires_grad and ours.in_proj_bias.requires_grad
    with pytest.raises(TypeError, match="module"):
        SPLoRAMultiheadAttention.from_module(nn.Linear(8, 8))


def test_convert_replaces_attention_in_a_transformer_layer():
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Linear(16, 3))
    converted = spa_kernels.convert(model, rank=2)
    attention = converted[0].self_attn
    assert type(attention) is SPLoRAMultiheadAttention
    assert all(type(getattr(attention, name)) is SPLoRALinear for name in PROJECTIONS)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        for name in PROJECTIONS:
            getattr(attention, name).adapter.cols.zero_()
        assert_close(converted(x), model(x), "zero adapter keeps the output")
        attention.q_proj.adapter.cols.normal_()
        attention.v_proj.adapter.cols.normal_()
    again = spa_kernels.convert(converted)[0].self_attn  # converting twice keeps the adapters
    assert type(again) is SPLoRAMultiheadAttention
    assert torch.equal(again.q_proj.adapter.cols, attention.q_proj.adapter.cols)
    train_out = converted(x)
    converted.eval()
    with torch.no_grad():
        eval_out = converted(x)
        assert (eval_out - model.eval()(x)).abs().max() > 1e-3, "the adapter is not used in eval"
    assert_close(eval_out, train_out, "eval (no_grad) vs train")
    frozen = {name for name, p in converted.named_parameters() if not p.requires_grad}
    assert "0.self_attn.q_proj.weight" in frozen and "0.self_attn.out_proj.weight" in frozen


def test_convert_keeps_sp_adapters_attention_adapters():
    theirs = sp_adapters.SPLoRAMultiheadAttention(16, 4, rank=3)
    randomise_adapters(theirs)
    model = nn.Sequential(theirs)
    converted = spa_kernels.convert(model, rank=9)
    assert type(converted[0]) is SPLoRAMultiheadAttention and converted[0].rank == 3
    query = torch.randn(5, 2, 16)
    with torch.no_grad():
        assert_close(converted[0](query, query, query)[0], theirs(query, query, query)[0], "converted sp_adapters")


# ----------------------------------------------------------------------------- bad input and compile


@pytest.mark.parametrize("kwargs, error, argument", [
    (dict(head_mask=torch.ones(3, dtype=torch.bool)), ValueError, "head_mask"),
    (dict(head_mask=torch.ones(4)), TypeError, "head_mask"),
    (dict(head_mask=[True] * 4), TypeError, "head_mask"),
    (dict(in_mask=torch.ones(15, dtype=torch.bool)), ValueError, "in_mask"),
    (dict(out_mask=torch.ones(16, dtype=torch.int64)), TypeError, "out_mask"),
    (dict(key_in_mask=torch.ones(16, 1, dtype=torch.bool)), ValueError, "key_in_mask"),
])
def test_bad_masks_raise_naming_the_argument(kwargs, error, argument):
    layer = SPLoRAMultiheadAttention(16, 4)
    with pytest.raises(error, match=argument):
        layer.set_masks(**({"head_mask": torch.tensor([True, False, True, True])} | kwargs))
    assert layer.head_idx is None, "a rejected call changed the masks"


@pytest.mark.parametrize("kwargs, error, argument", [
    (dict(embed_dim=16, num_heads=5), ValueError, "num_heads"),
    (dict(embed_dim=16, num_heads=0), ValueError, "num_heads"),
    (dict(embed_dim=16.0, num_heads=4), TypeError, "embed_dim"),
    (dict(embed_dim=16, num_heads=4, dropout=1.5), ValueError, "dropout"),
    (dict(embed_dim=16, num_heads=4, rank=0), ValueError, "rank"),
])
def test_bad_constructor_arguments(kwargs, error, argument):
    with pytest.raises(error, match=argument):
        SPLoRAMultiheadAttention(**kwargs)


def test_bad_forward_inputs_raise_naming_the_argument():
    layer = SPLoRAMultiheadAttention(16, 4, kdim=6)
    q, k, v = torch.randn(5, 2, 16), torch.randn(7, 2, 6), torch.randn(7, 2, 16)
    cases = [
        (dict(query=torch.randn(5, 2, 15)), ValueError, "query"),
        (dict(key=torch.randn(7, 2, 16)), ValueError, "key"),
        (dict(value=torch.randn(6, 2, 16)), ValueError, "value"),
        (dict(key_padding_mask=torch.zeros(2, 6, dtype=torch.bool)), ValueError, "key_padding_mask"),
        (dict(attn_mask=torch.zeros(5, 5, dtype=torch.bool)), ValueError, "attn_mask"),
        (dict(attn_mask=torch.zeros(5, 7, dtype=torch.int64)), TypeError, "attn_mask"),
        (dict(is_causal=True), ValueError, "attn_mask"),
        (dict(query=torch.randn(2, 5, 2, 16)), ValueError, "query"),
    ]
    for overrides, error, argument in cases:
        args = dict(query=q, key=k, value=v) | overrides
        with pytest.raises(error, match=argument):
            layer(**args)


def test_forward_compiles_without_graph_breaks():
    layer = make_pruned()
    query = torch.randn(2, 5, 16)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    for need_weights in (True, False):
        expected = layer(query, query, query, need_weights=need_weights)[0]
        assert torch.equal(compiled(query, query, query, need_weights=need_weights)[0], expected)


def test_channel_groups_of_a_converted_transformer_prune_whole_heads():
    from spa_kernels.pruning import AttentionGroup, channel_groups

    model = nn.Sequential(nn.Linear(8, 16), nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True),
                          nn.Linear(16, 3))
    converted = spa_kernels.convert(model, rank=2)
    groups = channel_groups(converted, torch.randn(2, 5, 8))
    plain = [(group.producers, group.consumers) for group in groups if not isinstance(group, AttentionGroup)]
    assert plain == [(["1.linear1"], ["1.linear2"])]
    heads = [group for group in groups if isinstance(group, AttentionGroup)]
    assert len(heads) == 1 and heads[0].size == 4
    attention = converted[1].self_attn
    assert heads[0].producers == [f"1.self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj")]
    assert heads[0].consumers == ["1.self_attn.out_proj"]
    keep = torch.tensor([True, False, False, True])
    heads[0].apply(converted, keep)
    assert torch.equal(attention.head_mask, keep) and attention.head_idx.tolist() == [0, 3]
    assert torch.equal(attention.out_proj.in_mask, keep.repeat_interleave(4))
    assert torch.equal(heads[0].kept(converted), keep)
    inside = [g for g in channel_groups(converted, torch.randn(2, 5, 8), whole_heads=False)
              if isinstance(g, AttentionGroup)]
    assert [(g.size, g.producers, g.consumers) for g in inside] == [
        (16, ["1.self_attn.q_proj", "1.self_attn.k_proj"], []),
        (16, ["1.self_attn.v_proj"], ["1.self_attn.out_proj"]),
    ]
