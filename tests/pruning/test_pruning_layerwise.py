"""Layer-wise pruning (SLS): per-block silhouette scores, the depth rule, the truncation wrapper."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.pruning_models import ResidualBlock
from torch import nn

import spa_kernels
from spa_kernels.pruning import layerwise, load_task, save_task
from spa_kernels.pruning.layerwise import (
    TruncatedBlocks,
    block_features,
    block_scores,
    choose_depth,
    embedding_silhouette,
    global_average_pool,
    truncate,
)

# ---------------------------------------------------------------------------------------------------------------
# The depth rule


@pytest.mark.parametrize(
    ("scores", "alpha", "depth"),
    [
        # T = 0.9 × 0.62 = 0.558: 0.62 and 0.6 reach it, 0.5 falls under -> keep blocks 1..4
        ([0.1, 0.2, 0.5, 0.6, 0.62], 0.9, 4),
        # T = 0.31: 0.62, 0.6, 0.5 reach it, 0.2 falls under -> keep blocks 1..3
        ([0.1, 0.2, 0.5, 0.6, 0.62], 0.5, 3),
        # T = 0.186: only block 1 (0.1) falls under -> keep blocks 1..2
        ([0.1, 0.2, 0.5, 0.6, 0.62], 0.3, 2),
        # T = 0.062: no block falls under -> the first block is enough
        ([0.1, 0.2, 0.5, 0.6, 0.62], 0.1, 1),
        # not monotone, T = 0.25: the dip at block 5 (0.2) stops the walk at once -> keep all 6
        ([0.5, 0.1, 0.4, 0.45, 0.2, 0.5], 0.5, 6),
        # same scores, T = 0.15: the walk passes 0.5, 0.2, 0.45, 0.4 and stops at 0.1 (block 2) -> keep 1..3
        ([0.5, 0.1, 0.4, 0.45, 0.2, 0.5], 0.3, 3),
        # a score equal to T reaches it (0.5 × 0.5 = 0.25 exactly)
        ([0.25, 0.5], 0.5, 1),
        ([0.24, 0.5], 0.5, 2),
        # alpha = 1: the run must score at least the last block's score
        ([0.1, 0.7, 0.6, 0.7], 1.0, 4),
        ([0.1, 0.8, 0.7, 0.7], 1.0, 2),
        # alpha = 0: the run must be non-negative
        ([-0.1, 0.2, -0.05, 0.3], 0.0, 4),
        ([-0.1, 0.0, 0.3], 0.0, 2),
        # the last block's score is not positive: no basis to drop anything -> keep all
        ([0.3, 0.2, -0.1], 0.5, 3),
        ([0.3, 0.0], 0.5, 2),
        # one block
        ([0.4], 0.9, 1),
        ([-0.4], 0.9, 1),
    ],
)
def test_choose_depth_hand_computed(scores, alpha, depth):
    assert choose_depth(scores, alpha) == depth
    assert choose_depth(tuple(scores), alpha) == depth
    assert choose_depth(torch.tensor(scores, dtype=torch.float64), alpha) == depth


def _depth_by_definition(scores: list[float], alpha: float) -> int:
    """min{d : every block from d to the last scores at least alpha × last} (all blocks if last <= 0)."""
    if scores[-1] <= 0:
        return len(scores)
    threshold = alpha * scores[-1]
    return min(d for d in range(1, len(scores) + 1) if all(s >= threshold for s in scores[d - 1:]))


@settings(max_examples=200, deadline=None)
@given(
    scores=st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=1, max_size=12),
    alpha=st.floats(0.0, 1.0, allow_nan=False),
)
def test_choose_depth_matches_its_definition(scores, alpha):
    depth = choose_depth(scores, alpha)
    assert depth == _depth_by_definition(scores, alpha)
    assert 1 <= depth <= len(scores)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, math.nan, math.inf])
def test_choose_depth_rejects_alpha_out_of_range(alpha):
    with pytest.raises(ValueError, match="alpha"):
        choose_depth([0.1, 0.2], alpha)


@pytest.mark.parametrize("alpha", [True, "0.5", None])
def test_choose_depth_rejects_alpha_of_wrong_type(alpha):
    with pytest.raises(TypeError, match="alpha"):
        choose_depth([0.1, 0.2], alpha)


@pytest.mark.parametrize(
    ("scores", "error"),
    [
        ([], ValueError),
        ([0.1, math.nan], ValueError),
        ([0.1, math.inf], ValueError),
        (["a", 0.2], TypeError),
        ([True, 0.2], TypeError),
        ("0.1", TypeError),
        (0.5, TypeError),
        (torch.zeros(2, 2), ValueError),
    ],
)
def test_choose_depth_rejects_bad_scores(scores, error):
    with pytest.raises(error, match="scores"):
        choose_depth(scores, 0.5)


# ---------------------------------------------------------------------------------------------------------------
# Silhouette scoring


def test_global_average_pool():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    expected = torch.tensor([[sum(range(c * 20, c * 20 + 20)) / 20 for c in range(n * 3, n * 3 + 3)]
                             for n in range(2)])
    torch.testing.assert_close(global_average_pool(x), expected)
    flat = torch.randn(4, 6)
    assert global_average_pool(flat) is flat
    with pytest.raises(ValueError, match="at least"):
        global_average_pool(torch.randn(5))


def test_silhouette_of_a_hand_computed_square():
    # PCA of 2-D points to 2 components is a rotation about the mean, which keeps every distance and so the
    # silhouette: the score must be the silhouette of the points themselves, computed here by its definition.
    # Classes {(0,0), (0,1), (0,0.5)} and {(4,0), (4,1)}.
    features = torch.tensor([[0.0, 0.0], [0.0, 1.0], [4.0, 0.0], [4.0, 1.0], [0.0, 0.5]])
    labels = torch.tensor([0, 0, 1, 1, 0])
    points = features.tolist()

    def dist(p, q):
        return math.dist(p, q)

    values = []
    for i, p in enumerate(points):
        mine = [dist(p, q) for j, q in enumerate(points) if j != i and labels[j] == labels[i]]
        other = [dist(p, q) for j, q in enumerate(points) if labels[j] != labels[i]]
        a, b = sum(mine) / len(mine), sum(other) / len(other)
        values.append((b - a) / max(a, b))
    expected = sum(values) / len(values)
    assert embedding_silhouette(features, labels, embedding="pca") == pytest.approx(expected, rel=1e-9)
    # the four corners alone: every point has a = 1 (its class mate) and b = (4 + sqrt(17)) / 2
    square = embedding_silhouette(features[:4], labels[:4], embedding="pca")
    assert square == pytest.approx(1 - 2 / (4 + math.sqrt(17)), rel=1e-9)


def _clustered(samples_per_class: int = 30, classes: int = 3, dim: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(samples_per_class)
    centres = 6.0 * torch.randn(classes, dim, generator=generator)
    separated = centres[labels] + 0.5 * torch.randn(len(labels), dim, generator=generator)
    noise = torch.randn(len(labels), dim, generator=generator)
    return separated, noise, labels


@pytest.mark.parametrize("embedding", ["pca", "tsne"])
def test_separated_features_score_higher_than_noise(embedding):
    separated, noise, labels = _clustered()
    high = embedding_silhouette(separated, labels, embedding=embedding)
    low = embedding_silhouette(noise, labels, embedding=embedding)
    assert high > 0.5
    assert abs(low) < 0.2
    assert high > low + 0.4


@pytest.mark.parametrize("embedding", ["pca", "tsne"])
def test_embedding_is_seeded(embedding):
    separated, noise, labels = _clustered(samples_per_class=15)
    mixed = 0.3 * separated + noise
    first = embedding_silhouette(mixed, labels, embedding=embedding, seed=3)
    assert embedding_silhouette(mixed, labels, embedding=embedding, seed=3) == first
    assert -1.0 <= first <= 1.0


class _Separate(nn.Module):
    """Maps (N, 1, H, W) class codes to a channels-first feature map whose pooled vector clusters by class."""

    def __init__(self, centres: torch.Tensor):
        super().__init__()
        self.register_buffer("centres", centres)

    def forward(self, x):
        codes = x[:, 0, 0, 0].long()
        pooled = self.centres[codes]  # (N, C)
        generator = torch.Generator().manual_seed(1)
        jitter = 0.3 * torch.randn(x.shape[0], pooled.shape[1], 2, 2, generator=generator)
        return pooled[:, :, None, None] + jitter


class _Drown(nn.Module):
    """Adds noise large enough to hide the classes."""

    def forward(self, x):
        generator = torch.Generator().manual_seed(2)
        return x + 100.0 * torch.randn(x.shape, generator=generator)


class _Model(nn.Module):
    def __init__(self, blocks: nn.Sequential):
        super().__init__()
        self.blocks = blocks

    def forward(self, x):
        return self.blocks(x).sum()


def _class_code_inputs(samples_per_class: int = 20, classes: int = 3):
    labels = torch.arange(classes).repeat_interleave(samples_per_class)
    x = labels.float()[:, None, None, None].expand(-1, 1, 3, 3).clone()
    return x, labels


@pytest.mark.parametrize("embedding", ["pca", "tsne"])
def test_block_scores_rank_separating_block_above_noise(embedding):
    centres = 5.0 * torch.eye(3, 6)
    model = _Model(nn.Sequential(_Separate(centres), _Drown()))
    x, labels = _class_code_inputs()
    separating, noisy = block_scores(model, "blocks", x, labels, embedding=embedding)
    assert separating > 0.5
    assert separating > noisy + 0.4


def test_block_scores_equal_the_silhouette_of_pooled_outputs():
    centres = 5.0 * torch.eye(3, 6)
    model = _Model(nn.Sequential(_Separate(centres), _Drown()))
    x, labels = _class_code_inputs()
    first = model.blocks[0](x)
    second = model.blocks[1](first)
    expected = [embedding_silhouette(y.mean(dim=(2, 3)), labels, embedding="pca") for y in (first, second)]
    assert block_scores(model, model.blocks, x, labels, embedding="pca") == pytest.approx(expected, rel=1e-9)


def test_block_features_in_batches_match_one_batch_and_restore_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Sequential(ResidualBlock(4, 4), ResidualBlock(4, 4)))
    model.train()
    x = torch.randn(10, 2, 5, 5)
    whole = block_features(model, "1", x)
    parts = block_features(model, "1", [x[:3], x[3:7], x[7:]])
    assert model.training
    assert all(not block._forward_hooks for block in model[1])
    model.eval()
    with torch.no_grad():
        y1 = model[1][0](model[0](x))
        y2 = model[1][1](y1)
    for got in (whole, parts):
        assert len(got) == 2
        torch.testing.assert_close(got[0], y1.mean(dim=(2, 3)))
        torch.testing.assert_close(got[1], y2.mean(dim=(2, 3)))


def test_block_scores_take_labels_per_batch():
    centres = 5.0 * torch.eye(3, 6)
    model = _Model(nn.Sequential(_Separate(centres), _Drown()))
    x, labels = _class_code_inputs()
    whole = block_scores(model, "blocks", x, labels)
    # the noise of _Separate and _Drown is drawn per call, so two batches give other features than one:
    # compare the ranking, not the values
    batched = block_scores(model, "blocks", [x[:30], x[30:]], [labels[:30], labels[30:]])
    assert len(batched) == len(whole) == 2
    assert batched[0] > batched[1] + 0.4


def test_block_features_custom_reduce_for_tokens():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    x = torch.randn(3, 5, 4)  # (N, tokens, C)
    features = block_features(model, "0", x, reduce=lambda y: y[:, 0])
    with torch.no_grad():
        torch.testing.assert_close(features[0], model[0][0](x)[:, 0])


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(nn.Identity())

    def forward(self, x):
        return self.blocks(self.blocks(x))


def test_block_features_require_each_block_once_per_batch():
    with pytest.raises(ValueError, match="exactly once"):
        block_features(_Twice(), "blocks", torch.randn(4, 3))
    model = _Model(nn.Sequential(nn.Identity(), nn.Identity()))
    truncate(model, "blocks", 1)
    with pytest.raises(ValueError, match="exactly once"):
        block_features(model, "blocks", torch.randn(4, 3))
    assert all(not block._forward_hooks for block in model.blocks)


def test_block_scores_validate_their_arguments():
    model = _Model(nn.Sequential(nn.Identity(), nn.Identity()))
    x, labels = torch.randn(12, 3), torch.arange(3).repeat(4)
    with pytest.raises(ValueError, match="embedding"):
        block_scores(model, "blocks", x, labels, embedding="umap")
    with pytest.raises(ValueError, match="labels"):
        block_scores(model, "blocks", x, labels[:-1])
    with pytest.raises(ValueError, match="2 classes"):
        block_scores(model, "blocks", x, torch.zeros(12, dtype=torch.long))
    with pytest.raises(TypeError, match="labels"):
        block_scores(model, "blocks", x, labels.float())
    with pytest.raises(ValueError, match="no submodule"):
        block_scores(model, "missing", x, labels)
    with pytest.raises(TypeError, match="nn.Sequential"):
        block_scores(model, "blocks.0", x, labels)
    with pytest.raises(ValueError, match="submodule of model"):
        block_scores(model, nn.Sequential(nn.Identity()), x, labels)
    with pytest.raises(TypeError, match="inputs"):
        block_scores(model, "blocks", [x, "batch"], labels)
    with pytest.raises(ValueError, match="perplexity"):
        embedding_silhouette(x, labels, embedding="tsne", perplexity=0)
    with pytest.raises(ValueError, match="NaN"):
        embedding_silhouette(torch.full((12, 3), math.nan), labels)


def _hide_scikit_learn(monkeypatch) -> None:
    """Make every ``import sklearn...`` fail, including modules imported earlier in this process."""
    names = {"sklearn", "sklearn.decomposition", "sklearn.manifold", "sklearn.metrics"}
    names |= {name for name in sys.modules if name.startswith("sklearn.")}
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def test_scoring_without_scikit_learn_raises_a_clear_import_error(monkeypatch):
    _hide_scikit_learn(monkeypatch)
    separated, _, labels = _clustered(samples_per_class=5)
    with pytest.raises(ImportError, match="scikit-learn"):
        embedding_silhouette(separated, labels)


def test_module_imports_without_scikit_learn(monkeypatch):
    # execute the module's source afresh (as another module) while scikit-learn cannot be imported
    _hide_scikit_learn(monkeypatch)
    spec = importlib.util.spec_from_file_location("_layerwise_without_sklearn", layerwise.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.choose_depth([0.1, 0.5], 0.5) == 2


# ---------------------------------------------------------------------------------------------------------------
# The truncation wrapper


class _Counting(nn.Module):
    """Adds a constant and counts its calls."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self.calls = 0
        self.weight = nn.Parameter(torch.tensor(value))

    def forward(self, x):
        self.calls += 1
        return x + self.value


def _counting_blocks(count: int = 5) -> nn.Sequential:
    return nn.Sequential(*(_Counting(10.0 ** i) for i in range(count)))


@pytest.mark.parametrize("depth", [0, 1, 2, 5])
def test_wrapper_calls_only_the_first_depth_blocks(depth):
    blocks = _counting_blocks()
    wrapper = TruncatedBlocks(blocks, depth)
    out = wrapper(torch.zeros(3))
    assert [block.calls for block in blocks] == [1] * depth + [0] * (5 - depth)
    expected = sum(10.0 ** i for i in range(depth))  # 0, 1, 11, 11111
    assert torch.equal(out, torch.full((3,), expected))


def test_wrapper_keeps_blocks_and_state_dict_names():
    blocks = _counting_blocks()
    wrapper = TruncatedBlocks(blocks, 2)
    assert len(wrapper) == 5
    assert all(a is b for a, b in zip(wrapper, blocks, strict=True))
    assert list(wrapper.state_dict()) == list(blocks.state_dict()) == [f"{i}.weight" for i in range(5)]


def test_wrapper_slices_and_copies():
    blocks = _counting_blocks()
    wrapper = TruncatedBlocks(blocks, 2)
    part = wrapper[1:3]
    assert type(part) is nn.Sequential
    assert list(part) == [blocks[1], blocks[2]]
    assert wrapper[4] is blocks[4]
    clone = copy.deepcopy(wrapper)
    assert isinstance(clone, TruncatedBlocks) and clone.depth == 2
    assert torch.equal(clone(torch.zeros(1)), torch.tensor([11.0]))


def test_wrapper_depth_is_validated():
    blocks = _counting_blocks(3)
    with pytest.raises(ValueError, match=r"depth must lie in \[0, 3\]"):
        TruncatedBlocks(blocks, 4)
    with pytest.raises(ValueError, match="depth"):
        TruncatedBlocks(blocks, -1)
    with pytest.raises(TypeError, match="depth"):
        TruncatedBlocks(blocks, 1.5)
    with pytest.raises(TypeError, match="depth"):
        TruncatedBlocks(blocks, True)
    with pytest.raises(TypeError, match="blocks"):
        TruncatedBlocks(nn.ModuleList(blocks), 1)
    wrapper = TruncatedBlocks(blocks, 1)
    with pytest.raises(ValueError, match="depth"):
        wrapper.depth = 7
    assert wrapper.depth == 1


def test_task_metadata_round_trip():
    saved = TruncatedBlocks(_counting_blocks(), 3)
    assert saved.task_metadata() == {"depth": 3}
    blocks = _counting_blocks()
    loaded = TruncatedBlocks(blocks, 5)
    loaded.load_task_metadata(saved.task_metadata())
    assert loaded.depth == 3
    loaded(torch.zeros(1))
    assert [block.calls for block in blocks] == [1, 1, 1, 0, 0]


@pytest.mark.parametrize(
    ("metadata", "error", "match"),
    [
        ({"depth": 6}, ValueError, r"metadata\['depth'\]"),
        ({"depth": -1}, ValueError, r"metadata\['depth'\]"),
        ({"depth": "2"}, TypeError, r"metadata\['depth'\]"),
        ({"depth": 2.0}, TypeError, r"metadata\['depth'\]"),
        ({}, ValueError, "depth"),
        ({"depth": 2, "width": 3}, ValueError, "exactly"),
        ([("depth", 2)], TypeError, "mapping"),
    ],
)
def test_task_metadata_is_validated(metadata, error, match):
    wrapper = TruncatedBlocks(_counting_blocks(), 4)
    with pytest.raises(error, match=match):
        wrapper.load_task_metadata(metadata)
    assert wrapper.depth == 4


class _Net(nn.Module):
    """stem → body.blocks (residual blocks of one width) → pool → head."""

    def __init__(self, blocks: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 3, padding=1)
        self.body = nn.Module()
        self.body.blocks = nn.Sequential(*(ResidualBlock(6, 6) for _ in range(blocks)))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.body.blocks(torch.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("adapted", [False, True])
def test_truncate_gives_exactly_the_prefix_output(adapted):
    torch.manual_seed(0)
    model = _Net()
    if adapted:
        model = spa_kernels.convert(model, rank=2)
    model.eval()
    x = torch.randn(3, 2, 6, 6)
    original = list(model.body.blocks)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        full = model(x)
        h = torch.relu(model.stem(x))
        for block in original[:2]:
            h = block(h)
        prefix = model.head(h.mean(dim=(2, 3)))
        wrapper = truncate(model, "body.blocks", 2)
        assert isinstance(model.body.blocks, TruncatedBlocks) and model.body.blocks is wrapper
        assert torch.equal(model(x), prefix)
        assert not torch.equal(prefix, full)
        # parameter names are unchanged: the shared base's weights load as they are
        assert list(model.state_dict()) == list(state)
        model.load_state_dict(state)
        # truncating again sets the depth of the same wrapper, back to all blocks here
        assert truncate(model, "body.blocks", 4) is wrapper
        assert torch.equal(model(x), full)


def test_depth_travels_in_a_task_package(tmp_path):
    torch.manual_seed(0)
    base = spa_kernels.convert(_Net(), rank=2)
    task, shared = copy.deepcopy(base), copy.deepcopy(base)
    with torch.no_grad():
        for name, parameter in task.named_parameters():
            if "adapter" in name or name.startswith("head"):
                parameter.normal_()
    truncate(task, "body.blocks", 2)
    save_task(task, tmp_path / "task.spa", task_specific=["head"])
    truncate(shared, "body.blocks", 4)  # a shared model is wrapped once; each task package sets the depth
    assert load_task(shared, tmp_path / "task.spa") == {"body.blocks": {"depth": 2}}
    assert shared.body.blocks.depth == 2
    task.eval()
    shared.eval()
    x = torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        assert torch.equal(shared(x), task(x))


def test_truncate_validates_its_arguments():
    model = _Net()
    with pytest.raises(ValueError, match="no submodule"):
        truncate(model, "body.missing", 1)
    with pytest.raises(TypeError, match="nn.Sequential"):
        truncate(model, "head", 1)
    with pytest.raises(TypeError, match="blocks_name"):
        truncate(model, "", 1)
    with pytest.raises(ValueError, match="depth"):
        truncate(model, "body.blocks", 5)
    assert not isinstance(model.body.blocks, TruncatedBlocks)
