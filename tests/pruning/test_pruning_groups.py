"""Coupled channel groups: what is tied, how masks are set, and exact zeros through norms and residuals.

Expected groups are written out by hand from each architecture; outputs of a pruned
network are checked against a physically compacted copy built here layer by layer.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from support.pruning_models import ResidualCNN, TinyMLP, one_torch_thread, residual_cnn_input  # noqa: F401 (fixture)
from torch import Tensor, nn

from bench.resnet import ResNet, compacted_network
from bench.shapes import RESNET18_56
from spa_kernels import convert
from spa_kernels.pruning._layers import spa_layers
from spa_kernels.pruning.groups import (
    ChannelGroup,
    NormChannelMask,
    channel_groups,
    install_norm_masks,
    remove_norm_masks,
)

RESNET18_NARROW = dataclasses.replace(RESNET18_56, stage_channels=(8, 16, 24, 32), classes=10)
"""ResNet-18's topology (stages, blocks, projections, names) at widths that keep the tests quick."""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def summary(groups: list[ChannelGroup]) -> list[tuple[int, list[str], list[str], list[str]]]:
    return [(g.size, g.producers, g.consumers, g.norms) for g in groups]


def random_keep(size: int, generator: torch.Generator) -> Tensor:
    keep = torch.rand(size, generator=generator) < 0.5
    keep[torch.randint(size, (1,), generator=generator)] = True  # never empty
    return keep


def identity(maps_of: ChannelGroup, name: str) -> bool:
    channel_map = {**maps_of.out_maps, **maps_of.in_maps, **maps_of.norm_maps}[name]
    return torch.equal(channel_map.group_index, channel_map.layer_index)


@pytest.fixture
def residual_cnn() -> nn.Module:
    model = convert(ResidualCNN(), rank=2)
    with torch.no_grad():  # non-trivial norms: a pruned channel would not come out of them as zero
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-1, 1)
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
        for layer in spa_layers(model).values():
            layer.adapter.cols.normal_()
    return model


# --------------------------------------------------------------------------------------------------
# Which channels are tied


RESIDUAL_CNN_GROUPS = [
    (8, ["stem", "block.conv2"], ["block.conv1", "down.conv1", "down.shortcut.0"], ["stem_bn", "block.bn2"]),
    (8, ["block.conv1"], ["block.conv2"], ["block.bn1"]),
    (16, ["down.conv1"], ["down.conv2"], ["down.bn1"]),
    (16, ["down.conv2", "down.shortcut.0"], ["head"], ["down.bn2", "down.shortcut.1"]),
]


def test_residual_cnn_groups(residual_cnn):
    groups = channel_groups(residual_cnn, residual_cnn_input())
    assert summary(groups) == RESIDUAL_CNN_GROUPS
    for group in groups:
        for name in group.producers + group.consumers + group.norms:
            assert identity(group, name)
    assert all("head" not in g.producers for g in groups)  # the classes are a model output


def test_tiny_mlp_groups():
    model = convert(TinyMLP(), rank=2)
    groups = channel_groups(model, torch.randn(2, 12))
    assert summary(groups) == [(16, ["fc1"], ["fc2"], []), (16, ["fc2"], ["head"], [])]


def resnet18_expected_groups() -> list[tuple[int, list[str], list[str], list[str]]]:
    """ResNet-18's groups from its architecture: one residual stream per stage, one inner group per block."""
    stages = RESNET18_NARROW.stage_channels
    expected = []
    for stage, width in enumerate(stages, start=1):
        blocks = [f"layer{stage}.{b}" for b in range(RESNET18_NARROW.blocks_per_stage)]
        if stage == 1:  # the stem writes the first stream
            producers, norms, readers = ["conv1"], ["bn1"], []
        else:  # the first block's projection and second convolution write it
            producers = [f"{blocks[0]}.conv2", f"{blocks[0]}.downsample.0"]
            norms, readers = [f"{blocks[0]}.bn2", f"{blocks[0]}.downsample.1"], []
        for position, block in enumerate(blocks):
            if stage == 1 or position > 0:  # identity shortcut: the block reads and adds to the stream
                producers.append(f"{block}.conv2")
                norms.append(f"{block}.bn2")
                readers.append(f"{block}.conv1")
        if stage < len(stages):
            readers += [f"layer{stage + 1}.0.conv1", f"layer{stage + 1}.0.downsample.0"]
        else:
            readers.append("fc")
        expected.append((width, producers, readers, norms))
        expected += [(width, [f"{b}.conv1"], [f"{b}.conv2"], [f"{b}.bn1"]) for b in blocks]
    return expected


def resnet_model() -> nn.Module:
    model = convert(ResNet(RESNET18_NARROW), rank=2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.bias.uniform_(-1, 1)
                module.running_mean.uniform_(-1, 1)
    return model


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, list[ChannelGroup]]:
    torch.manual_seed(0)
    model = resnet_model()
    return model, channel_groups(model, torch.randn(1, 3, 16, 16))


def test_resnet18_groups(resnet):
    _, groups = resnet
    assert sorted(summary(groups)) == sorted(resnet18_expected_groups())
    assert len(groups) == 12


class ConcatFlatten(nn.Module):
    """Two convolutions concatenated into a batch norm, then a flatten into a linear head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 2, 1)
        self.bn = nn.BatchNorm2d(6)
        self.c = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 2 * 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        return self.fc(torch.flatten(self.c(y), 1))


def test_concatenation_offsets_and_flatten_strides():
    model = convert(ConcatFlatten(), rank=1)
    groups = channel_groups(model, torch.randn(1, 3, 2, 2))
    assert summary(groups) == [(4, ["a"], ["c"], ["bn"]), (2, ["b"], ["c"], ["bn"]), (5, ["c"], ["fc"], [])]
    b_group, c_group = groups[1], groups[2]
    assert b_group.in_maps["c"].layer_index.tolist() == [4, 5]  # after a's 4 channels
    assert b_group.in_maps["c"].group_index.tolist() == [0, 1]
    assert b_group.norm_maps["bn"].layer_index.tolist() == [4, 5]
    fc_map = c_group.in_maps["fc"]  # channel j of c is read by fc inputs 4j .. 4j+3
    assert fc_map.group_index.tolist() == [j for j in range(5) for _ in range(4)]
    assert fc_map.layer_index.tolist() == list(range(20))
    assert fc_map.channels == 20


def test_concatenation_and_flatten_masks_match_compacted_network():
    model = convert(ConcatFlatten(), rank=1).eval()
    with torch.no_grad():
        model.bn.bias.uniform_(-1, 1)
    groups = channel_groups(model, torch.randn(1, 3, 2, 2))
    keeps = [torch.tensor([True, False, True, True]), torch.tensor([False, True]),
             torch.tensor([True, False, False, True, True])]
    for group, keep in zip(groups, keeps, strict=True):
        group.apply(model, keep)
    bn_keep = torch.cat(keeps[:2])
    assert torch.equal(model.c.in_mask, bn_keep)
    assert torch.equal(model.fc.in_mask, keeps[2].repeat_interleave(4))
    x = torch.randn(3, 3, 2, 2)
    a, b, c, fc = model.a.compact(), model.b.compact(), model.c.compact(), model.fc.compact()
    bn_idx = bn_keep.nonzero().flatten()
    bn = nn.BatchNorm2d(int(bn_keep.sum())).eval()
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, name).copy_(getattr(model.bn, name)[bn_idx])
    want = fc(torch.flatten(c(F.relu(bn(torch.cat([a(x), b(x)], 1)))), 1))
    captured = {}
    model.bn.register_forward_hook(lambda m, i, o: captured.setdefault("bn", o))
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)
    assert (captured["bn"][:, ~bn_keep] == 0).all()


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.b = nn.Conv2d(4, 6, 1)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        features = self.b(F.relu(self.dw(F.relu(self.a(x)))))
        return features, self.head(features.mean((2, 3)))


def test_depthwise_convolution_is_producer_and_consumer_and_feature_outputs_are_not_pruned():
    model = convert(Depthwise(), rank=1)
    groups = channel_groups(model, torch.randn(1, 3, 4, 4))
    # b's channels are a model output (the features), as are the head's classes
    assert summary(groups) == [(4, ["a", "dw"], ["dw", "b"], [])]
    keep = torch.tensor([True, False, False, True])
    groups[0].apply(model, keep)
    assert torch.equal(model.dw.in_mask, keep) and torch.equal(model.dw.out_mask, keep)


class HalfConverted(nn.Module):
    """``fc2`` is an ``nn.Linear`` subclass, which convert() leaves as it is."""

    class Opaque(nn.Linear):
        pass

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = self.Opaque(6, 7)
        self.fc3 = nn.Linear(7, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))))


def test_groups_touching_an_unconverted_layer_are_left_out():
    model = convert(HalfConverted(), rank=1)  # logs that it leaves fc2 alone
    assert sorted(spa_layers(model)) == ["fc1", "fc3", "head"]
    assert summary(channel_groups(model, torch.randn(2, 5))) == [(8, ["fc3"], ["head"], [])]


def test_ignored_layers_by_name_module_and_container(residual_cnn):
    x = residual_cnn_input()
    by_name = channel_groups(residual_cnn, x, ignored_layers=["block.conv1"])
    assert summary(by_name) == [RESIDUAL_CNN_GROUPS[0]] + RESIDUAL_CNN_GROUPS[2:]
    by_module = channel_groups(residual_cnn, x, ignored_layers=[residual_cnn.down.shortcut])
    # the shortcut writes the 16-channel stream
    assert summary(by_module) == RESIDUAL_CNN_GROUPS[:3]
    container = channel_groups(residual_cnn, x, ignored_layers=["down"])
    assert summary(container) == RESIDUAL_CNN_GROUPS[:2]


def test_bad_arguments(residual_cnn):
    x = residual_cnn_input()
    with pytest.raises(ValueError, match="ignored_layers"):
        channel_groups(residual_cnn, x, ignored_layers=["nope"])
    with pytest.raises(ValueError, match="ignored_layers"):
        channel_groups(residual_cnn, x, ignored_layers=[nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="ignored_layers"):
        channel_groups(residual_cnn, x, ignored_layers=[3])
    with pytest.raises(TypeError, match="example_inputs"):
        channel_groups(residual_cnn, 3.0)
    with pytest.raises(TypeError, match="model"):
        channel_groups("model", x)
    group = channel_groups(residual_cnn, x)[1]
    with pytest.raises(TypeError, match="keep"):
        group.apply(residual_cnn, torch.ones(8))
    with pytest.raises(ValueError, match="keep"):
        group.apply(residual_cnn, torch.ones(7, dtype=torch.bool))
    with pytest.raises(ValueError, match="block.conv1"):
        group.apply(convert(TinyMLP(), rank=1), torch.ones(8, dtype=torch.bool))


def test_groups_of_a_model_on_another_dtype_and_with_dict_inputs():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = TinyMLP()

        def forward(self, *, features: Tensor) -> Tensor:
            return self.mlp(features)

    model = convert(Keyword(), rank=1).double()
    groups = channel_groups(model, {"features": torch.randn(2, 12, dtype=torch.float64)})
    assert summary(groups) == [(16, ["mlp.fc1"], ["mlp.fc2"], []), (16, ["mlp.fc2"], ["mlp.head"], [])]
    assert model.mlp.fc1.weight.dtype == torch.float64  # the model is not touched


# --------------------------------------------------------------------------------------------------
# Scores


def test_score_is_the_mean_over_producers(residual_cnn):
    group = channel_groups(residual_cnn, residual_cnn_input())[0]
    scores = {"stem": torch.arange(8.0), "block.conv2": torch.full((8,), 2.0), "head": torch.zeros(4)}
    torch.testing.assert_close(group.score(scores), (torch.arange(8.0) + 2) / 2)
    with pytest.raises(ValueError, match="block.conv2"):
        group.score({"stem": torch.arange(8.0)})
    with pytest.raises(ValueError, match="stem"):
        group.score({"stem": torch.arange(7.0), "block.conv2": torch.ones(8)})
    with pytest.raises(ValueError, match="NaN"):
        group.score({"stem": torch.full((8,), float("nan")), "block.conv2": torch.ones(8)})
    with pytest.raises(TypeError, match="stem"):
        group.score({"stem": [1.0] * 8, "block.conv2": torch.ones(8)})


def test_score_of_a_flattened_consumer_group_uses_producer_channels_only():
    model = convert(ConcatFlatten(), rank=1)
    group = channel_groups(model, torch.randn(1, 3, 2, 2))[2]
    scores = torch.tensor([5.0, 4, 3, 2, 1])
    torch.testing.assert_close(group.score({"c": scores}), scores)


# --------------------------------------------------------------------------------------------------
# Masks and exact zeros


def draw_residual_cnn_keeps(groups, generator) -> list[Tensor]:
    return [random_keep(group.size, generator) for group in groups]


def test_apply_sets_every_member_and_kept_reads_it_back(residual_cnn):
    groups = channel_groups(residual_cnn, residual_cnn_input())
    keeps = draw_residual_cnn_keeps(groups, torch.Generator().manual_seed(1))
    for group, keep in zip(groups, keeps, strict=True):
        group.apply(residual_cnn, keep)
    residual, inner_block, inner_down, stream16 = keeps
    m = residual_cnn
    expected = {  # layer: (in_mask, out_mask)
        "stem": (torch.ones(3, dtype=torch.bool), residual),
        "block.conv1": (residual, inner_block),
        "block.conv2": (inner_block, residual),
        "down.conv1": (residual, inner_down),
        "down.conv2": (inner_down, stream16),
        "down.shortcut.0": (residual, stream16),
        "head": (stream16, torch.ones(4, dtype=torch.bool)),
    }
    for name, (in_mask, out_mask) in expected.items():
        layer = m.get_submodule(name)
        assert torch.equal(layer.in_mask, in_mask), name
        assert torch.equal(layer.out_mask, out_mask), name
    for group, keep in zip(groups, keeps, strict=True):
        assert torch.equal(group.kept(m), keep)
    # one producer narrower than the others: the group counts only what all keep
    narrower = residual.clone()
    narrower[residual.nonzero()[0]] = False
    m.stem.set_masks(out_mask=narrower)
    assert torch.equal(groups[0].kept(m), narrower)


def compact_residual_cnn(model: nn.Module, keeps: list[Tensor]):
    """The pruned ResidualCNN built physically smaller, layer by layer (train/eval as ``model``)."""
    residual, inner_block, inner_down, stream16 = [keep.nonzero().flatten() for keep in keeps]

    def norm(bn: nn.BatchNorm2d, idx: Tensor) -> nn.BatchNorm2d:
        small = nn.BatchNorm2d(idx.numel(), eps=bn.eps, momentum=bn.momentum)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(small, name).copy_(getattr(bn, name)[idx])
        return small.train(bn.training)

    m = model
    stem, block_conv1, block_conv2 = m.stem.compact(), m.block.conv1.compact(), m.block.conv2.compact()
    down_conv1, down_conv2 = m.down.conv1.compact(), m.down.conv2.compact()
    shortcut = m.down.shortcut[0].compact()
    head = m.head.compact()
    stem_bn, block_bn1, block_bn2 = norm(m.stem_bn, residual), norm(m.block.bn1, inner_block), norm(
        m.block.bn2, residual)
    down_bn1, down_bn2, shortcut_bn = norm(m.down.bn1, inner_down), norm(m.down.bn2, stream16), norm(
        m.down.shortcut[1], stream16)

    def forward(x: Tensor) -> Tensor:
        y = F.relu(stem_bn(stem(x)))
        y = F.relu(block_bn2(block_conv2(F.relu(block_bn1(block_conv1(y))))) + y)
        y = F.relu(down_bn2(down_conv2(F.relu(down_bn1(down_conv1(y))))) + shortcut_bn(shortcut(y)))
        return head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))

    return forward


def capture_residual_operands(model: nn.Module, blocks: list[nn.Module], captured: list):
    """Record both operands of every residual add and every norm output, via forward hooks."""
    handles = []
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_hook(lambda m, i, o: captured.append((m, o))))
    for block in blocks:
        shortcut = getattr(block, "shortcut", None) or getattr(block, "downsample", None)
        if shortcut is not None:  # a module: an Identity or a projection
            handles.append(shortcut.register_forward_hook(lambda m, i, o: captured.append((m, o))))
        else:  # BasicBlock without downsample adds its own input
            handles.append(block.register_forward_pre_hook(lambda m, i: captured.append((m, i[0]))))
    return handles


@pytest.mark.parametrize("train", [False, True])
def test_residual_cnn_pruned_channels_are_exact_zeros_and_outputs_match_the_compacted_network(
        residual_cnn, train):
    model = residual_cnn.train(train)
    x = residual_cnn_input(batch=3)
    groups = channel_groups(model, x)
    keeps = draw_residual_cnn_keeps(groups, torch.Generator().manual_seed(2))
    for group, keep in zip(groups, keeps, strict=True):
        group.apply(model, keep)
    residual, inner_block, inner_down, stream16 = keeps
    channel_keep = {
        model.stem_bn: residual, model.block.bn1: inner_block, model.block.bn2: residual,
        model.block.shortcut: residual, model.down.bn1: inner_down, model.down.bn2: stream16,
        model.down.shortcut: stream16, model.down.shortcut[1]: stream16,
    }
    reference = compact_residual_cnn(copy.deepcopy(model), keeps)
    captured: list = []
    handles = capture_residual_operands(model, [model.block, model.down], captured)
    out = model(x)
    for handle in handles:
        handle.remove()
    assert len(captured) == len(channel_keep)
    for module, tensor in captured:
        keep = channel_keep[module]
        assert (tensor[:, ~keep] == 0).all(), module
        assert (tensor[:, keep] != 0).any(), module
    torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-5)


def test_unpruned_norm_passes_output_through_and_gradients_flow(residual_cnn):
    groups = channel_groups(residual_cnn, residual_cnn_input())
    x = residual_cnn_input()
    before = residual_cnn.eval()(x)
    groups[1].apply(residual_cnn, torch.ones(8, dtype=torch.bool))
    torch.testing.assert_close(residual_cnn(x), before, rtol=0, atol=0)
    keep = torch.tensor([True, False] * 4)
    groups[1].apply(residual_cnn, keep)
    residual_cnn.train()
    residual_cnn(x).square().sum().backward()
    grad = residual_cnn.block.bn1.weight.grad
    assert (grad[~keep] == 0).all() and (grad[keep] != 0).any()


def test_norm_masks_follow_the_producer_mask_buffers(residual_cnn):
    model = residual_cnn.eval()
    x = residual_cnn_input()
    group = channel_groups(model, x)[1]
    group.apply(model, torch.tensor([True] * 4 + [False] * 4))
    captured = {}
    model.block.bn1.register_forward_hook(lambda m, i, o: captured.__setitem__("bn1", o))
    model(x)
    assert (captured["bn1"][:, 4:] == 0).all() and (captured["bn1"][:, :4] != 0).all()
    # masks changed without the group (as load_task would): the norm follows the producer
    keep = torch.tensor([False] * 4 + [True] * 4)
    model.block.conv1.set_masks(out_mask=keep)
    model.block.conv2.set_masks(in_mask=keep)
    model(x)
    assert (captured["bn1"][:, :4] == 0).all() and (captured["bn1"][:, 4:] != 0).all()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["block.conv1.out_mask"] = torch.tensor([True] * 8)
    model.load_state_dict(state)
    model(x)
    assert (captured["bn1"] != 0).all()


def test_install_is_idempotent_copies_are_independent_and_removal_works(residual_cnn):
    model = residual_cnn.eval()
    x = residual_cnn_input()
    groups = channel_groups(model, x)
    keep = torch.tensor([True, False] * 4)
    groups[0].apply(model, keep)
    groups[0].apply(model, keep)
    install_norm_masks(model, groups)

    def hooks(m: nn.Module) -> int:
        return sum(isinstance(h, NormChannelMask) for h in m._forward_hooks.values())

    norms = (model.stem_bn, model.block.bn2, model.block.bn1, model.down.bn2)
    assert [hooks(m) for m in norms] == [1, 1, 1, 1]
    twin = copy.deepcopy(model)
    twin.stem.set_masks(out_mask=torch.ones(8, dtype=torch.bool))
    captured = {}
    model.stem_bn.register_forward_hook(lambda m, i, o: captured.__setitem__("model", o))
    twin.stem_bn.register_forward_hook(lambda m, i, o: captured.__setitem__("twin", o))
    model(x), twin(x)
    assert (captured["model"][:, ~keep] == 0).all()
    assert (captured["twin"] != 0).all()
    assert remove_norm_masks(model) == len([m for g in groups for m in g.norms])
    model(x)
    assert (captured["model"][:, ~keep] != 0).all()  # beta - mean·gamma/sigma, no longer zeroed
    # groups can be found again on a model that has the hooks
    assert summary(channel_groups(twin, x)) == RESIDUAL_CNN_GROUPS


def resnet_channel_keep(name: str, masks: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
    """The channels kept in the tensor captured at module ``name`` (a norm, a projection or a block input)."""
    if name == "bn1":
        return masks["conv1"][1]
    if name.endswith(("bn1", "bn2")):
        return masks[name[:-3] + "conv" + name[-1]][1]
    if name.endswith(("downsample", "downsample.1")):
        return masks[name.removesuffix(".1") + ".0"][1]
    return masks[name + ".conv1"][0]  # a block's input, read by its first convolution


def test_resnet18_pruned_channels_are_exact_zeros_and_match_the_compacted_network(resnet):
    model, groups = resnet
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(3)
    for group in groups:
        group.apply(model, random_keep(group.size, generator))
    layers = spa_layers(model)
    masks = {name: (layer.in_mask.clone(), layer.out_mask.clone()) for name, layer in layers.items()}
    x = torch.randn(3, 3, 16, 16)
    for train in (False, True):
        model.train(train)
        compact = compacted_network(model, masks).train(train)
        blocks = [m for m in model.modules() if type(m).__name__ == "BasicBlock"]
        captured: list = []
        handles = capture_residual_operands(model, blocks, captured)
        out = model(x)
        for handle in handles:
            handle.remove()
        by_name = {module: name for name, module in model.named_modules()}
        for module, tensor in captured:
            keep = resnet_channel_keep(by_name[module], masks)
            assert (tensor[:, ~keep] == 0).all(), by_name[module]
        # batch statistics of three 1×1 maps (the last stage in training) amplify rounding differences
        tolerance = 1e-3 if train else 1e-5
        torch.testing.assert_close(out, compact(x), rtol=tolerance, atol=tolerance)


def test_norm_mask_is_built_once_per_mask_change(residual_cnn, monkeypatch):
    model = residual_cnn.eval()
    x = residual_cnn_input()
    group = channel_groups(model, x)[1]
    group.apply(model, torch.tensor([True, False] * 4))
    builds = []
    original = NormChannelMask._build
    monkeypatch.setattr(NormChannelMask, "_build",
                        lambda self, *a: builds.append(self.name) or original(self, *a))
    for _ in range(3):
        model(x)
    assert builds == ["block.bn1"]
    model.block.conv1.set_masks(out_mask=torch.tensor([True, True] * 4))
    model(x), model(x)
    assert builds == ["block.bn1"] * 2
    model.double()(x.double())  # another dtype (and new buffers) needs a new mask
    assert builds == ["block.bn1"] * 3
