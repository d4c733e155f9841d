"""The user's flow end to end on four small models, and the README's whole-model example as written.

Each model goes through every step a user takes: convert with the head excluded,
prune coupled channel groups (whole heads in attention), one AdamW step, save the
task and load it into a freshly converted copy of the base, compile, a bf16-autocast
training step, and compaction.  Each step is tested in depth elsewhere; here they run
one after the other on the same model, so that what one step leaves behind (hooks,
index lists, optimizer-updated buffers, a loaded package) is what the next one gets.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest
import torch
from support.whole_models import (
    HAS_TRANSFORMERS,
    EncoderClassifier,
    encoder_input,
    hf_bert,
    hf_bert_input,
    hf_resnet,
    hf_resnet_input,
    hf_vit,
    hf_vit_input,
    logits,
)

import spa_kernels
from spa_kernels.nn import ChannelMasked, PrunedHeadsAttention
from spa_kernels.pruning import AttentionGroup, channel_groups, load_task, save_task

README = Path(__file__).resolve().parents[2] / "README.md"

# name: (build the base model, one batch of its input, its head, whether it has attention)
MODELS = {
    "torch-encoder": (lambda: EncoderClassifier(heads=4), encoder_input, "head", True),
    "hf-vit": (hf_vit, hf_vit_input, "classifier", True),
    "hf-bert": (hf_bert, hf_bert_input, "classifier", True),
    "hf-resnet": (hf_resnet, hf_resnet_input, "classifier", False),
}


def keep_pattern(group) -> torch.Tensor:
    """Every other head of an attention layer; two channels of every three elsewhere."""
    every = torch.arange(group.size)
    return every % 2 == 0 if isinstance(group, AttentionGroup) else every % 3 != 1


def train_step(model, x, autocast_dtype=None) -> list[torch.nn.Parameter]:
    """One AdamW step on the trainable parameters; returns them, their gradients still set."""
    trainable = [p for p in model.train().parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss = logits(model(x)).float().logsumexp(1).mean()
    loss.backward()
    optimizer.step()
    return trainable


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    error = (got - want).abs().max().item()
    print(f"{what}: max error {error:.3e}")
    assert error <= 1e-5 * max(want.abs().max().item(), 1.0), what


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
@pytest.mark.parametrize("name", MODELS)
def test_convert_prune_train_save_load_compile_autocast_compact(name, tmp_path):
    build, make_input, head, has_attention = MODELS[name]
    base, x = build(), make_input()
    model = spa_kernels.convert(copy.deepcopy(base), rank=2, exclude=[head])
    assert all(not isinstance(m, ChannelMasked) for m in model.get_submodule(head).modules())

    groups = channel_groups(model, (x,))
    assert any(isinstance(g, AttentionGroup) for g in groups) == has_attention
    for group in groups:
        group.apply(model, keep_pattern(group))

    trainable = train_step(model, x)
    assert all(p.grad is not None for p in trainable)
    assert any(p.grad.abs().sum() > 0 for p in model.get_submodule(head).parameters())

    save_task(model, tmp_path / "task.spa")
    fresh = spa_kernels.convert(copy.deepcopy(base), rank=2, exclude=[head])
    load_task(fresh, tmp_path / "task.spa")
    model.eval()
    fresh.eval()
    with torch.no_grad():
        want = logits(model(x))
        assert torch.equal(logits(fresh(x)), want), "the loaded task computes what the saved model did"
        assert_close(logits(torch.compile(fresh, fullgraph=True, backend="aot_eager")(x)), want, "compiled")

    trainable = train_step(model, x, autocast_dtype=torch.bfloat16)
    grads = [p.grad for p in trainable]
    assert all(g is not None and g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in grads)
    assert all(p.dtype == torch.float32 for p in trainable)

    model.eval()
    small = spa_kernels.compact(model, (x,)).eval()
    assert not any(isinstance(m, ChannelMasked) for m in small.modules())
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    if name == "torch-encoder":  # our attention with every other head pruned holds the kept heads only
        assert all(isinstance(layer.self_attn, PrunedHeadsAttention) and layer.self_attn.num_heads == 2
                   for layer in small.encoder.layers)
    x = make_input(batch=3)
    with torch.no_grad():
        assert_close(logits(small(x)), logits(model(x)), "compact")


def readme_block(heading: str) -> str:
    """The first fenced python block after the markdown ``heading``."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n")
    match = re.compile(r"```python\n(.*?)```", re.DOTALL).search(text, start)
    assert match is not None, f"no python block after {heading!r} in the README"
    return match.group(1)


def test_readme_whole_model_example_runs_as_written(tmp_path, monkeypatch, capsys):
    code = readme_block("## A whole model")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102  (the README's own example)
    assert os.path.exists(tmp_path / "task.spa")
    x, small, fresh = namespace["x"], namespace["small"], namespace["fresh"]
    with torch.no_grad():
        assert_close(small(x), fresh.eval()(x), "the README's compacted model")
    assert "converted" in capsys.readouterr().out.lower()
