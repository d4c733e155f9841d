"""Whole models: prune, train one step, save a task, load it into a fresh converted copy: identical outputs."""

from __future__ import annotations

import io
import warnings

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
from torch import nn

import spa_kernels
from spa_kernels.pruning._layers import spa_layers
from spa_kernels.pruning.package import load_task, save_task

needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
MODELS = {
    "residual_cnn": (ResidualCNN, residual_cnn_input, "head"),
    "torch_encoder": (EncoderClassifier, encoder_input, "head"),
    "hf_vit": (hf_vit, hf_vit_input, "classifier"),
    "hf_bert": (hf_bert, hf_bert_input, "classifier"),
}
PARAMS = [pytest.param(name, marks=needs_transformers) if name.startswith("hf_") else name for name in MODELS]


def prune_at_random(model: nn.Module, keep: float = 0.6) -> None:
    generator = torch.Generator().manual_seed(3)
    for layer in spa_layers(model).values():
        layer.set_masks(torch.rand(layer.in_mask.shape, generator=generator) < keep,
                        torch.rand(layer.out_mask.shape, generator=generator) < keep)


@pytest.mark.parametrize("name", PARAMS)
def test_task_package_reproduces_the_trained_model_exactly(name):
    build, make_input, head = MODELS[name]
    torch.manual_seed(0)
    base = build()
    model = spa_kernels.convert(base, rank=2, exclude=[head])
    prune_at_random(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    logits(model(make_input())).square().mean().backward()
    optimizer.step()

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing trainable is left out
        save_task(model, buffer)
    fresh = spa_kernels.convert(base, rank=2, exclude=[head])
    load_task(fresh, io.BytesIO(buffer.getvalue()))
    model.eval()
    fresh.eval()
    x = make_input()
    # With grad enabled: under no_grad an eval-mode torch encoder layer takes torch's fused fast
    # path, which reads the linear weights directly instead of calling the SPA layers.
    want, got = logits(model(x)), logits(fresh(x))
    untrained = logits(spa_kernels.convert(base, rank=2, exclude=[head]).eval()(x))
    difference = (got - want).abs().max().item()
    print(f"{name}: max difference after load {difference:.3e}")
    assert difference == 0.0
    assert not torch.equal(untrained, want)  # the task did change the model
