"""torch.compile(fullgraph=True) on pruned models and on the functional ops; mask changes recompile at most once."""

from __future__ import annotations

import math

import pytest
import torch
from support.pruning_models import ResidualCNN, residual_cnn_input
from support.whole_models import (
    HAS_TRANSFORMERS,
    EncoderClassifier,
    encoder_input,
    hf_bert,
    hf_bert_input,
    hf_vit,
    hf_vit_input,
    logits,
)
from torch._dynamo.testing import CompileCounter

import spa_kernels
from spa_kernels.pruning import channel_groups

needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
TRANSFORMERS = {
    "torch_encoder": (EncoderClassifier, encoder_input, "head"),
    "hf_vit": (hf_vit, hf_vit_input, "classifier"),
    "hf_bert": (hf_bert, hf_bert_input, "classifier"),
}


def prune_groups(model, groups, density: float) -> None:
    """Keep the first ``density`` of every group's channels (at least two): a monotone schedule."""
    for group in groups:
        kept = max(2, math.ceil(density * group.size))
        group.apply(model, torch.arange(group.size) < kept)


@pytest.fixture
def pruned_cnn():
    torch._dynamo.reset()
    model = spa_kernels.convert(ResidualCNN(), rank=2, exclude=["head"]).eval()
    x = residual_cnn_input()
    groups = channel_groups(model, (x,))
    prune_groups(model, groups, 0.75)
    yield model, groups, x
    torch._dynamo.reset()


def test_pruned_model_with_norm_hooks_compiles_whole(pruned_cnn):
    model, _, x = pruned_cnn
    want = model(x)
    got = torch.compile(model, fullgraph=True)(x)
    error = (got - want).abs().max().item()
    print(f"compiled against eager: max error {error:.3e}")
    assert error <= 1e-5 * max(want.abs().max().item(), 1.0)


def test_mask_changes_reuse_the_graph(pruned_cnn):
    model, groups, x = pruned_cnn
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    compiled(x)
    assert counter.frame_count == 1
    for step, density in enumerate([0.6, 0.5, 0.4, 0.3]):
        prune_groups(model, groups, density)
        assert torch.allclose(compiled(x), model(x), atol=1e-6), step
        assert counter.frame_count <= 2, f"recompiled at density {density}"  # one recompile at most


def test_first_pruning_recompiles_once():
    torch._dynamo.reset()
    model = spa_kernels.convert(ResidualCNN(), rank=2, exclude=["head"]).eval()
    x = residual_cnn_input()
    groups = channel_groups(model, (x,))
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    compiled(x)  # unpruned: every index list is None
    for density in (0.75, 0.5, 0.25):
        prune_groups(model, groups, density)
        assert torch.allclose(compiled(x), model(x), atol=1e-6)
    assert counter.frame_count == 2
    torch._dynamo.reset()


def test_functional_op_with_index_lists_compiles_whole_and_still_checks_them():
    torch._dynamo.reset()
    x, weight = torch.randn(4, 9), torch.randn(7, 9)
    lora_a, lora_b = torch.randn(2, 9), torch.randn(7, 2)

    def layer(x, in_idx, out_idx):
        return spa_kernels.splora_linear(x, weight, lora_a, lora_b, None, in_idx, out_idx)

    compiled = torch.compile(layer, fullgraph=True)
    in_idx, out_idx = torch.tensor([0, 2, 5]), torch.tensor([1, 3])
    assert torch.equal(compiled(x, in_idx, out_idx), layer(x, in_idx, out_idx))
    with pytest.raises(RuntimeError, match="in_idx holds indices outside"):
        compiled(x, torch.tensor([0, 9]), out_idx)
    with pytest.raises(RuntimeError, match="out_idx must be strictly increasing"):
        compiled(x, in_idx, torch.tensor([3, 1]))
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["torch_encoder", pytest.param("hf_vit", marks=needs_transformers),
                                  pytest.param("hf_bert", marks=needs_transformers)])
def test_pruned_transformers_trace_without_graph_breaks(name):
    build, make_input, head = TRANSFORMERS[name]
    torch._dynamo.reset()
    model = spa_kernels.convert(build(), rank=2, exclude=[head]).eval()
    x = make_input()
    for group in channel_groups(model, (x,)):
        group.apply(model, torch.arange(group.size) <= group.size // 2)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)  # fullgraph: a graph break raises
    error = (logits(compiled(x)) - logits(model(x))).abs().max().item()
    print(f"{name}: traced against eager, max error {error:.3e}")
    assert error <= 1e-5 and counter.frame_count == 1
    torch._dynamo.reset()
