"""compact_activations: the same outputs, gradients and running statistics as the full-width masked model.

Every test compares a compact-activation model with a deep copy of itself left full
width (the masked model as pruning leaves it, norm-mask hooks included), and checks
that the tensors inside compacted groups really hold only the active channels.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from support.pruning_models import ResidualCNN, one_torch_thread, residual_cnn_input  # noqa: F401
from support.whole_models import HAS_TRANSFORMERS, EncoderClassifier, encoder_input, logits
from torch import Tensor, nn

import spa_kernels
from spa_kernels.compact_activations import CompactBatchNorm, CompactLayerNorm, CompactNorm, MaskAgreement
from spa_kernels.nn import ChannelMasked
from spa_kernels.pruning import channel_groups, load_task, save_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
TOLERANCE = 1e-5


def hf_resnet(layer_type: str) -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          layer_type=layer_type, num_labels=3)
    return ResNetForImageClassification(config)


def randomise(model: nn.Module) -> None:
    """Adapters, biases, norm affines and running statistics away from their initial values."""
    norms = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)
    with torch.no_grad():
        for module in model.modules():
            for name, parameter in module.named_parameters(recurse=False):
                if parameter.requires_grad:
                    shift = 1.0 if isinstance(module, norms) and name == "weight" else 0.0
                    parameter.copy_(torch.randn_like(parameter) * 0.3 + shift)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn_like(module.running_mean) * 0.1)
                module.running_var.copy_(torch.rand_like(module.running_var) + 0.5)


def prune_randomly(model: nn.Module, groups, density: float = 0.5, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for group in groups:
        keep = torch.rand(group.size, generator=generator) < density
        keep[torch.randint(group.size, (1,), generator=generator)] = True  # never a group with nothing left
        group.apply(model, keep)


def pruned_pair(build, inputs, density: float = 0.5, **convert_args):
    """(full-width model, compact-activation copy, groups), pruned alike."""
    model = spa_kernels.convert(build(), rank=2, **convert_args)
    randomise(model)
    groups = channel_groups(model, inputs)
    prune_randomly(model, groups, density)
    compact = spa_kernels.compact_activations(copy.deepcopy(model), inputs)
    return model, compact, groups


def run(model: nn.Module, inputs: Tensor, weights: Tensor | None = None):
    """Output, loss and (after backward) the gradients of the input and of every trainable parameter."""
    x = inputs.clone().requires_grad_(inputs.is_floating_point())
    out = logits(model(x))
    weights = torch.linspace(-1, 1, out.numel()).view_as(out) if weights is None else weights
    (out * weights).sum().backward()
    grads = {name.removeprefix("_orig_mod."): p.grad.clone()  # the prefix of a compiled model
             for name, p in model.named_parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = None
    return out.detach(), (x.grad if x.requires_grad else None), grads


def assert_close(got: Tensor, want: Tensor, what: str) -> None:
    scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
    error = (got - want).abs().max().item() if want.numel() else 0.0
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} against {tuple(want.shape)}"
    assert error <= TOLERANCE * scale, f"{what}: max error {error:.3e}"


def assert_same_run(full: nn.Module, compact: nn.Module, inputs: Tensor) -> None:
    want_out, want_dx, want_grads = run(full, inputs)
    got_out, got_dx, got_grads = run(compact, inputs)
    assert_close(got_out, want_out, "output")
    if want_dx is not None:
        assert_close(got_dx, want_dx, "input gradient")
    assert got_grads.keys() == want_grads.keys()
    assert want_grads, "no trainable parameter got a gradient"
    for name, grad in want_grads.items():
        assert_close(got_grads[name], grad, f"gradient of {name}")


def channel_counts(model: nn.Module, inputs: Tensor) -> dict[str, int]:
    """Channels (dim 1) of the input of every batch norm, from one no-grad forward in eval mode."""
    counts: dict[str, int] = {}
    training = model.training
    handles = [module.register_forward_pre_hook(lambda m, args, name=name: counts.__setitem__(name, args[0].shape[1]))
               for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        model.eval()(inputs)  # eval: no running statistics change
    model.train(training)
    for handle in handles:
        handle.remove()
    return counts


def assert_norms_compact(model: nn.Module, groups, inputs: Tensor) -> int:
    """Every batch norm of a compacted group saw only its producers' active channels; how many did."""
    counts = channel_counts(model, inputs)
    compacted = 0
    for group in groups:
        for name in group.norms:
            if isinstance(model.get_submodule(name), CompactBatchNorm):
                kept = int(group.kept(model).sum())
                assert counts[name] == kept, f"{name} saw {counts[name]} channels, its group keeps {kept}"
                compacted += kept < group.size
    return compacted


# --------------------------------------------------------------------------------------------------
# A residual CNN with batch norms.


@pytest.mark.parametrize("conv_adapter", ["splora", "sppara"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_residual_cnn_matches_full_width(mode, conv_adapter):
    x = residual_cnn_input()
    full, compact, groups = pruned_pair(ResidualCNN, (x,), conv_adapter=conv_adapter)
    full.train(mode == "train")
    compact.train(mode == "train")
    assert all(isinstance(compact.get_submodule(n), CompactBatchNorm) for g in groups for n in g.norms)
    assert compact.head.compact_input and not compact.head.compact_output  # the classes are a model output
    assert not compact.stem.compact_input  # the image channels belong to no group
    assert assert_norms_compact(compact, groups, x) > 0
    before = {name: buffer.clone() for name, buffer in compact.named_buffers()}
    assert_same_run(full, compact, x)
    for group in groups:
        kept = group.kept(full)
        for name in group.norms:
            full_norm, compact_norm = full.get_submodule(name), compact.get_submodule(name)
            for stat in ("running_mean", "running_var"):
                got, want = getattr(compact_norm, stat), getattr(full_norm, stat)
                assert_close(got[kept], want[kept], f"{name}.{stat} of active channels")
                # pruned channels: untouched by compact training, whatever the full-width norm did
                assert torch.equal(got[~kept], before[f"{name}.{stat}"][~kept]), f"{name}.{stat} pruned"
            assert torch.equal(compact_norm.num_batches_tracked, full_norm.num_batches_tracked)


def test_state_dict_is_unchanged():
    x = residual_cnn_input()
    full, compact, _ = pruned_pair(ResidualCNN, (x,))
    want, got = full.state_dict(), compact.state_dict()
    assert list(got) == list(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    fresh = copy.deepcopy(full)
    fresh.load_state_dict(compact.state_dict())
    assert_close(compact.eval()(x), fresh.eval()(x), "output after a state-dict round trip")


def test_a_second_call_starts_over():
    x = residual_cnn_input()
    full, compact, groups = pruned_pair(ResidualCNN, (x,))
    spa_kernels.compact_activations(compact, (x,), groups=groups)
    hooks = [h for m in compact.modules() for h in m._forward_pre_hooks.values() if isinstance(h, MaskAgreement)]
    assert len(hooks) == 1
    assert_same_run(full.eval(), compact.eval(), x)


# --------------------------------------------------------------------------------------------------
# Masks change after compaction.


def test_mask_changes_and_task_switching():
    x = residual_cnn_input()
    full, compact, groups = pruned_pair(ResidualCNN, (x,))
    full.eval()
    compact.eval()
    # a group change through ChannelGroup.apply: the index lists follow, norms included
    prune_randomly(full, groups, density=0.3, seed=7)
    prune_randomly(compact, groups, density=0.3, seed=7)
    assert assert_norms_compact(compact, groups, x) > 0
    assert_same_run(full, compact, x)
    # tasks saved from full-width models load into the compact model
    tasks = []
    for seed, density in ((11, 0.6), (12, 0.25)):
        task_model = copy.deepcopy(full)
        randomise(task_model)
        prune_randomly(task_model, groups, density, seed)
        buffer = io.BytesIO()
        save_task(task_model, buffer)
        tasks.append((task_model, buffer.getvalue()))
    for task_model, package in tasks + tasks[:1]:
        load_task(compact, io.BytesIO(package))
        assert assert_norms_compact(compact, groups, x) > 0
        assert_same_run(task_model.eval(), compact, x)
    # and a package saved from the compact model reproduces it in a full-width one
    buffer = io.BytesIO()
    save_task(compact, buffer)
    fresh = copy.deepcopy(full)
    load_task(fresh, io.BytesIO(buffer.getvalue()))
    assert_same_run(fresh, compact, x)


def test_group_unpruned_again_runs_full_width():
    x = residual_cnn_input()
    full, compact, groups = pruned_pair(ResidualCNN, (x,))
    for model in (full, compact):
        for group in groups:
            group.apply(model, torch.ones(group.size, dtype=torch.bool))
    assert channel_counts(compact, x) == channel_counts(full, x)
    assert_same_run(full.train(), compact.train(), x)


def test_masks_that_disagree_inside_a_group_raise():
    x = residual_cnn_input()
    _, compact, groups = pruned_pair(ResidualCNN, (x,))
    group = next(g for g in groups if len(g.producers) > 1)
    layer = compact.get_submodule(group.producers[1])
    pruned = (~layer.out_mask).nonzero().flatten()
    assert pruned.numel() > 0
    out_mask = layer.out_mask.clone()
    out_mask[pruned[0]] = True
    layer.set_masks(out_mask=out_mask)
    with pytest.raises(RuntimeError, match=f"{group.producers[1]}.out_mask differs"):
        compact(x)


# --------------------------------------------------------------------------------------------------
# expand_activations: the way back.


def test_expand_activations_restores_full_width():
    x = residual_cnn_input()
    full, compact, groups = pruned_pair(ResidualCNN, (x,))
    assert spa_kernels.expand_activations(compact) is compact
    for module in compact.modules():
        assert not isinstance(module, CompactNorm)
        assert not any(isinstance(h, MaskAgreement) for h in module._forward_pre_hooks.values())
        if isinstance(module, ChannelMasked):
            assert not module.compact_input and not module.compact_output
    for name, module in full.named_modules():
        assert type(compact.get_submodule(name)) is type(module), name
    assert channel_counts(compact, x) == channel_counts(full, x)
    # the norm-mask hooks zero pruned channels again
    outputs = []
    norm_name = groups[1].norms[0]
    handle = compact.get_submodule(norm_name).register_forward_hook(lambda m, a, out: outputs.append(out) and None)
    with torch.no_grad():
        compact.eval()(x)
    handle.remove()
    kept = groups[1].kept(compact)
    assert outputs[0].shape[1] == groups[1].size
    assert torch.count_nonzero(outputs[0][:, ~kept]) == 0
    assert_same_run(full.train(), compact.train(), x)
    assert spa_kernels.expand_activations(compact) is compact  # nothing left to undo


# --------------------------------------------------------------------------------------------------
# Groups that stay full width.


class ConcatAndFlatten(nn.Module):
    """Two branches concatenated into a conv, then a flatten of 2×2 positions into a linear head."""

    def __init__(self):
        super().__init__()
        self.left = nn.Conv2d(3, 4, 3, padding=1)
        self.right = nn.Conv2d(3, 4, 3, padding=1)
        self.mix = nn.Conv2d(8, 6, 3, padding=1, stride=2)
        self.bn = nn.BatchNorm2d(6)
        self.inner = nn.Linear(24, 10)
        self.norm = nn.LayerNorm(10)
        self.head = nn.Linear(10, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(torch.cat([self.left(x), self.right(x)], 1))
        y = torch.relu(self.bn(self.mix(y)))
        return self.head(torch.relu(self.norm(self.inner(torch.flatten(y, 1)))))


def test_concat_and_flatten_stay_full_width_layer_norm_runs_compact():
    x = torch.randn(2, 3, 4, 4)
    full, compact, groups = pruned_pair(ConcatAndFlatten, (x,))
    assert len(groups) == 4  # left, right, mix and inner each write one group
    for name in ("left", "right", "mix"):
        layer = compact.get_submodule(name)
        assert not layer.compact_input and not layer.compact_output, name
    assert not compact.inner.compact_input  # mix's channels reach it through a flatten of 2×2 positions
    assert not isinstance(compact.bn, CompactNorm)
    assert compact.inner.compact_output and compact.head.compact_input
    assert isinstance(compact.norm, CompactLayerNorm)
    widths = []
    handle = compact.head.register_forward_pre_hook(lambda m, a: widths.append(a[0].shape[-1]))
    with torch.no_grad():
        compact.eval()(x)  # eval: the full-width batch norm's statistics stay as the reference's
    handle.remove()
    inner_group = next(g for g in groups if g.producers == ["inner"])
    assert widths == [int(inner_group.kept(compact).sum())] and widths[0] < inner_group.size
    for mode in ("train", "eval"):
        assert_same_run(full.train(mode == "train"), compact.train(mode == "train"), x)


def test_group_norm_group_stays_full_width():
    def build():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 6, 3),
                             nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))

    x = torch.randn(2, 3, 6, 6)
    full, compact, groups = pruned_pair(build, (x,))
    assert [g.norms for g in groups] == [["1"], ["4"]]
    assert not compact[0].compact_output and not compact[3].compact_input
    assert compact[3].compact_output and compact[8].compact_input and isinstance(compact[4], CompactBatchNorm)
    assert assert_norms_compact(compact, groups, x) == 1
    for mode in ("train", "eval"):
        assert_same_run(full.train(mode == "train"), compact.train(mode == "train"), x)


# --------------------------------------------------------------------------------------------------
# Whole models: Hugging Face ResNet, the torch encoder.


@needs_transformers
@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_hf_resnet_matches_full_width(layer_type):
    x = torch.randn(2, 3, 32, 32)
    full, compact, groups = pruned_pair(lambda: hf_resnet(layer_type), (x,))
    norms = [n for g in groups for n in g.norms]
    assert norms and all(isinstance(compact.get_submodule(n), CompactBatchNorm) for n in norms)
    assert assert_norms_compact(compact, groups, x) > 0
    for mode in ("train", "eval"):
        assert_same_run(full.train(mode == "train"), compact.train(mode == "train"), x)
    for name in norms:
        kept = next(g for g in groups if name in g.norms).kept(full)
        for stat in ("running_mean", "running_var"):
            got, want = getattr(compact.get_submodule(name), stat), getattr(full.get_submodule(name), stat)
            assert_close(got[kept], want[kept], f"{name}.{stat}")


def test_torch_encoder_compacts_its_feed_forward_only():
    tokens = encoder_input()
    full, compact, groups = pruned_pair(EncoderClassifier, (tokens,))
    for index in range(2):
        layer = compact.encoder.layers[index]
        assert layer.linear1.compact_output and layer.linear2.compact_input
        # the residual stream starts at the embedding: not prunable, full width
        assert not layer.linear2.compact_output and not layer.self_attn.out_proj.compact_output
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
            attention_layer = getattr(layer.self_attn, projection)
            assert not attention_layer.compact_input and not attention_layer.compact_output
    widths = {}
    handle = compact.encoder.layers[0].linear2.register_forward_pre_hook(
        lambda m, a: widths.__setitem__("ffn", a[0].shape[-1]))
    ffn_group = next(g for g in groups if g.producers == ["encoder.layers.0.linear1"])
    with torch.no_grad():
        compact(tokens)
    handle.remove()
    assert widths["ffn"] == int(ffn_group.kept(compact).sum()) < ffn_group.size
    for mode in ("train", "eval"):
        assert_same_run(full.train(mode == "train"), compact.train(mode == "train"), tokens)


# --------------------------------------------------------------------------------------------------
# torch.compile.


def test_compiled_compact_model_matches_full_width():
    torch._dynamo.reset()
    x = residual_cnn_input()
    full, compact, groups = pruned_pair(ResidualCNN, (x,))
    compiled = torch.compile(compact, fullgraph=True)
    try:
        for mode in ("train", "eval"):
            assert_same_run(full.train(mode == "train"), compiled.train(mode == "train"), x)
        for group in groups:  # running statistics were updated in the compiled graph too
            kept = group.kept(full)
            for name in group.norms:
                assert_close(compact.get_submodule(name).running_mean[kept],
                             full.get_submodule(name).running_mean[kept], f"{name}.running_mean")
        # prune further (never reviving a channel: the full-width model trained the pruned
        # channels' running statistics, the compact one left them as they were)
        generator = torch.Generator().manual_seed(5)
        for group in groups:
            keep = group.kept(full) & (torch.rand(group.size, generator=generator) < 0.6)
            keep[group.kept(full).nonzero()[0]] = True
            group.apply(full, keep)
            group.apply(compact, keep)
        assert assert_norms_compact(compact, groups, x) > 0
        assert_same_run(full.eval(), compiled.eval(), x)
    finally:
        torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------
# Bad input.


def test_bad_arguments_raise():
    x = residual_cnn_input()
    model = spa_kernels.convert(ResidualCNN(), rank=2)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        spa_kernels.compact_activations("model", x)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        spa_kernels.expand_activations(None)
    with pytest.raises(TypeError, match="groups must"):
        spa_kernels.compact_activations(model, x, groups=channel_groups(model, (x,))[0])
    with pytest.raises(TypeError, match="groups must hold ChannelGroup"):
        spa_kernels.compact_activations(model, x, groups=["stem"])
    other = spa_kernels.convert(ConcatAndFlatten(), rank=2)
    foreign = channel_groups(other, (torch.randn(1, 3, 4, 4),))
    with pytest.raises(ValueError, match="no SPA layer named"):
        spa_kernels.compact_activations(model, x, groups=foreign)
