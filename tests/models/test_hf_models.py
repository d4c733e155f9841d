"""Hugging Face models built from small configs: conversion, head groups and head pruning.

Nothing is downloaded: every model is built from a config with random weights.  The
oracle of head pruning is the same converted model without the head-skipping hooks:
its masks zero the pruned heads' q/k/v rows (biases included), so Hugging Face's own
core computes the dense model with those heads' outputs zeroed.
"""

from __future__ import annotations

import copy

import pytest
import torch

import spa_kernels
from spa_kernels.nn import SPLoRALinear
from spa_kernels.pruning import AttentionGroup, channel_groups, skip_pruned_heads

transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 50
LLAMA_LAYERS = 2


def vit():
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                     image_size=32, patch_size=16, num_labels=3, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return transformers.ViTForImageClassification(config), {"pixel_values": torch.randn(2, 3, 32, 32)}


def bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     attn_implementation="eager")
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # padding reaches the core as an additive mask
    return transformers.BertForSequenceClassification(config), {"input_ids": torch.randint(VOCAB, (2, 7)),
                                                                "attention_mask": mask}


def llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LLAMA_LAYERS, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=16,
                                      use_cache=False, attn_implementation="eager")
    return transformers.LlamaForCausalLM(config), {"input_ids": torch.randint(VOCAB, (2, 7))}


MODELS = {"vit": vit, "bert": bert, "llama": llama}
CORE_MODULES = {"vit": transformers.models.vit.modeling_vit, "bert": transformers.models.bert.modeling_bert,
                "llama": transformers.models.llama.modeling_llama}
PROJECTIONS = {"vit": 4 * 2 + 2 * 2 + 1, "bert": 4 * 2 + 2 * 2 + 2, "llama": 4 * 2 + 3 * 2 + 1}


def build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    base, inputs = MODELS[kind]()
    return base.eval(), inputs


def randomise_adapters(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SPLoRALinear):
                module.adapter.cols.normal_(std=0.2)
                if module.bias is not None:
                    module.bias.normal_(std=0.2)


def logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = TOL) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1.0)
    print(f"{what}: max abs error {err:.3e}, max |expected| {scale:.3e}")
    assert err <= tol * scale, f"{what}: max abs error {err:.3e}"


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_convert_makes_every_projection_splora_and_keeps_the_function(kind, caplog):
    base, inputs = build(kind)
    with caplog.at_level("WARNING", logger="spa_kernels"):
        model = spa_kernels.convert(base, rank=2)
    converted = [name for name, m in model.named_modules() if type(m) is SPLoRALinear]
    assert len(converted) == PROJECTIONS[kind], converted
    if kind == "vit":  # the 16×16 patch embedding has no centre tap for the adapter
        assert "patch_embeddings.projection" in caplog.text and "even" in caplog.text
        assert type(model.vit.embeddings.patch_embeddings.projection) is torch.nn.Conv2d
    with torch.no_grad():
        for name in converted:
            model.get_submodule(name).adapter.cols.zero_()
        assert_close(logits(model, inputs), logits(base, inputs), f"{kind}: zero adapter keeps the logits")
        randomise_adapters(model)
        eval_logits = logits(model, inputs)
        assert (eval_logits - logits(base, inputs)).abs().max() > 1e-3, "the adapters are not used"
    train_logits = logits(model.train(), inputs)
    assert_close(train_logits, eval_logits, f"{kind}: train (grad) vs eval (no_grad)")
    train_logits.sum().backward()
    attention = model.get_submodule(next(n for n in converted if n.endswith(("q_proj", "query"))))
    assert attention.weight.grad is None and attention.adapter.cols.grad.abs().sum() > 0


def head_groups(model, inputs, whole_heads=True) -> list[AttentionGroup]:
    groups = channel_groups(model, inputs, whole_heads=whole_heads)
    return [group for group in groups if isinstance(group, AttentionGroup)]


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_whole_head_groups_tie_qkv_rows_and_out_columns_per_head(kind):
    base, inputs = build(kind)
    model = spa_kernels.convert(base, rank=2)
    groups = head_groups(model, inputs)
    assert len(groups) == 2  # one per layer
    kv_heads = 2 if kind == "llama" else 4
    for group in groups:
        assert group.size == kv_heads
        assert len(group.producers) == 3 and len(group.consumers) == 1
        q_map = group.out_maps[group.block.q]
        k_map = group.out_maps[group.block.k]
        assert q_map.group_index.tolist() == [c // (32 // kv_heads) for c in range(32)]
        assert k_map.group_index.tolist() == [c // 8 for c in range(8 * kv_heads)]
        assert torch.equal(group.in_maps[group.block.out].group_index, q_map.group_index)
    projections = {name for group in groups for name in group.producers}
    outs = {name for group in groups for name in group.consumers}
    for group in channel_groups(model, inputs):
        if not isinstance(group, AttentionGroup):  # the MLP groups, say; none reaches into the heads
            assert not projections & set(group.producers) and not outs & set(group.consumers), group


def prune_heads(model, groups, keep_first: bool) -> None:
    for index, group in enumerate(groups):
        keep = torch.zeros(group.size, dtype=torch.bool)
        keep[(index + int(keep_first)) % group.size] = True
        if index == 0 and group.size > 2:
            keep[-1] = True
        group.apply(model, keep)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_pruned_heads_match_the_dense_oracle_and_the_core_skips_them(kind, monkeypatch):
    base, inputs = build(kind)
    model = spa_kernels.convert(base, rank=2)
    randomise_adapters(model)
    groups = head_groups(model, inputs)
    oracle = copy.deepcopy(model)  # no hooks yet: the core runs every head, pruned ones on zeros
    prune_heads(model, groups, keep_first=True)
    for group in groups:
        group.apply(oracle, group.kept(model))
    for module in oracle.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()

    core_heads: list[int] = []
    core = CORE_MODULES[kind].eager_attention_forward

    def counting_core(module, query, *args, **kwargs):
        core_heads.append(query.shape[1])
        return core(module, query, *args, **kwargs)

    monkeypatch.setattr(CORE_MODULES[kind], "eager_attention_forward", counting_core)
    model.train()
    oracle.train()
    got = logits(model, inputs)
    rep = 2 if kind == "llama" else 1
    expected_heads = [group.kept(model).sum().item() * rep for group in groups]
    assert core_heads == expected_heads, "the core ran over pruned heads"
    core_heads.clear()
    want = logits(oracle, inputs)
    assert core_heads == [4, 4]
    assert_close(got, want, f"{kind}: head-pruned forward vs the dense oracle")
    got.square().sum().backward()
    want.square().sum().backward()
    for (name, p), (_, q) in zip(model.named_parameters(), oracle.named_parameters(), strict=True):
        if p.requires_grad and p.grad is not None:
            assert_close(p.grad, q.grad, f"{kind}: gradient of {name}")
    for group in groups:  # a pruned head's q/k/v rows and out columns learn nothing
        kept = group.kept(model)
        for name, channel_map in group.out_maps.items():
            layer = model.get_submodule(name)
            pruned = ~kept[channel_map.group_index]
            assert layer.adapter.cols.grad[0][pruned].abs().max() == 0
            assert layer.bias is None or layer.bias.grad[pruned].abs().max() == 0
        out = model.get_submodule(group.block.out)
        assert out.adapter.rows.grad[0][:, ~kept[group.in_maps[group.block.out].group_index]].abs().max() == 0


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_head_pruned_gives_no_attention_output(kind):
    base, inputs = build(kind)
    model = spa_kernels.convert(base, rank=2)
    randomise_adapters(model)
    groups = head_groups(model, inputs)
    oracle = copy.deepcopy(model)
    for group in groups:
        group.apply(model, torch.zeros(group.size, dtype=torch.bool))
        group.apply(oracle, torch.zeros(group.size, dtype=torch.bool))
    for module in oracle.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    with torch.no_grad():
        assert_close(logits(model, inputs), logits(oracle, inputs), f"{kind}: all heads pruned")


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_channel_groups_inside_heads_tie_q_to_k_and_v_to_out(kind):
    base, inputs = build(kind)
    model = spa_kernels.convert(base, rank=2)
    randomise_adapters(model)
    groups = head_groups(model, inputs, whole_heads=False)
    assert len(groups) == 4
    qk = [g for g in groups if len(g.producers) == 2]
    vo = [g for g in groups if len(g.producers) == 1]
    kv_heads, head_dim = (2, 8) if kind == "llama" else (4, 8)
    for group in qk:
        assert not group.consumers
        assert group.size == kv_heads * (head_dim // 2 if kind == "llama" else head_dim)
    for group in vo:
        assert group.size == kv_heads * head_dim and len(group.consumers) == 1
    oracle = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    for group in groups:
        keep = torch.rand(group.size, generator=generator) < 0.5
        group.apply(model, keep)
        group.apply(oracle, keep)
    for group in qk:
        q_mask = model.get_submodule(group.block.q).out_mask.view(4, head_dim)
        k_mask = model.get_submodule(group.block.k).out_mask.view(kv_heads, head_dim)
        assert torch.equal(q_mask, k_mask.repeat_interleave(4 // kv_heads, dim=0)), "q and k keep other channels"
        if kind == "llama":  # rotary pairs j and j + head_dim/2 stay together
            assert torch.equal(k_mask[:, : head_dim // 2], k_mask[:, head_dim // 2:])
    for module in oracle.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    with torch.no_grad():
        assert_close(logits(model, inputs), logits(oracle, inputs), f"{kind}: channels pruned inside heads")


def test_skip_pruned_heads_is_idempotent_and_counts_layers():
    base, inputs = build("bert")
    model = spa_kernels.convert(base, rank=2)
    assert skip_pruned_heads(model) == 2
    assert skip_pruned_heads(model) == 2
    assert len(model.bert.encoder.layer[0].attention.self.query._forward_hooks) == 1
    with torch.no_grad():
        assert torch.isfinite(logits(model, inputs)).all()
