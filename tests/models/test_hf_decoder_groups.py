"""channel_groups on Hugging Face decoder language models: Llama's MLP, residual stream and heads; GPT-2.

Nothing is downloaded: every model is built from a small config with random weights.
The oracle of a pruned model is a float64 dense copy in which every SPA layer is a
plain ``nn.Linear`` holding its merged weight ``W + s·B A`` with the pruned rows,
columns and bias entries set to zero, and no hooks: Hugging Face's own code then runs
every head and every MLP channel, the pruned ones on zeros.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import spa_kernels
from spa_kernels.nn import SPLoRALinear
from spa_kernels.pruning import AttentionGroup, channel_groups

transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 50


def llama(layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2, intermediate: int = 48):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      intermediate_size=intermediate, max_position_embeddings=16, use_cache=False,
                                      attn_implementation="eager")
    model = spa_kernels.convert(transformers.LlamaForCausalLM(config).eval(), rank=2)
    with torch.no_grad():  # adapters far from zero, so a wrongly tied channel changes the logits
        for module in model.modules():
            if isinstance(module, SPLoRALinear):
                module.adapter.cols.normal_(std=0.2)
    return model, {"input_ids": torch.randint(VOCAB, (2, 7))}


def dense_oracle(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` with every SPA layer merged into a masked dense ``nn.Linear``."""
    oracle = copy.deepcopy(model)
    for name, layer in list(oracle.named_modules()):
        if not isinstance(layer, SPLoRALinear):
            continue
        with torch.no_grad():
            weight = layer.weight.double() + layer.scale * (layer.adapter.cols[0].double() @ layer.adapter.rows[0].double())
            weight *= layer.out_mask.double().unsqueeze(1) * layer.in_mask.double().unsqueeze(0)
            dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=torch.float64)
            dense.weight.copy_(weight)
            if layer.bias is not None:
                dense.bias.copy_(layer.bias.double() * layer.out_mask.double())
        oracle.set_submodule(name, dense)
    for module in oracle.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    return oracle.double()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1.0)
    print(f"{what}: max abs error {err:.3e}, max |expected| {scale:.3e}")
    assert err <= TOL * scale, f"{what}: max abs error {err:.3e}"


def mlp_groups(groups):
    return [group for group in groups if not isinstance(group, AttentionGroup)]


def test_llama_mlp_groups_tie_gate_and_up_rows_to_down_columns():
    model, inputs = llama()
    groups = channel_groups(model, inputs)
    mlp = mlp_groups(groups)
    expected = [(48, [f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj"],
                 [f"model.layers.{i}.mlp.down_proj"], []) for i in range(2)]
    assert [(g.size, g.producers, g.consumers, g.norms) for g in mlp] == expected
    for group in mlp:
        for channel_map in [*group.out_maps.values(), *group.in_maps.values()]:
            assert torch.equal(channel_map.group_index, torch.arange(48))
            assert torch.equal(channel_map.layer_index, torch.arange(48))
    keep = torch.rand(48, generator=torch.Generator().manual_seed(0)) < 0.5
    mlp[1].apply(model, keep)
    block = model.model.layers[1].mlp
    # SwiGLU multiplies gate and up channel by channel: both keep the same rows, and down the same columns
    assert torch.equal(block.gate_proj.out_mask, keep) and torch.equal(block.up_proj.out_mask, keep)
    assert torch.equal(block.down_proj.in_mask, keep)
    assert block.down_proj.out_mask.all() and block.gate_proj.in_mask.all()
    assert model.model.layers[0].mlp.gate_proj.out_mask.all(), "a group reached another layer"


def test_llama_residual_stream_is_not_prunable(caplog):
    model, inputs = llama()
    with caplog.at_level("DEBUG", logger="spa_kernels"):
        groups = channel_groups(model, inputs)
    # Only the attention heads and the MLP hidden channels are groups: the embedding (not an
    # SPA layer) writes the residual stream and RMSNorm scales it, so no mask can zero it.
    assert len(groups) == 4 and sum(isinstance(g, AttentionGroup) for g in groups) == 2
    writers = {n for n, _ in model.named_modules() if n.endswith(("o_proj", "down_proj"))}
    readers = {n for n, _ in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))}
    for group in groups:
        assert not writers & set(group.producers), group
        assert not (readers | {"lm_head"}) & set(group.consumers), group
    assert re.search(r"channels of model\.layers\.\d\.(mlp\.down_proj|self_attn\.o_proj) not prunable: .*cannot reach",
                     caplog.text), caplog.text
    assert "channels of lm_head not prunable: its channels are a model output" in caplog.text


@pytest.mark.parametrize("whole_heads", [True, False])
def test_llama_groups_pruned_at_half_match_the_dense_oracle(whole_heads):
    model, inputs = llama()
    with torch.no_grad():
        unpruned = model(**inputs).logits
    groups = channel_groups(model, inputs, whole_heads=whole_heads)
    assert len(groups) == (4 if whole_heads else 6)
    generator = torch.Generator().manual_seed(1)
    for group in groups:
        keep = torch.zeros(group.size, dtype=torch.bool)
        keep[torch.randperm(group.size, generator=generator)[: group.size // 2]] = True
        group.apply(model, keep)
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        assert torch.equal(mlp.gate_proj.out_mask, mlp.up_proj.out_mask)
        assert torch.equal(mlp.gate_proj.out_mask, mlp.down_proj.in_mask)
        assert mlp.gate_proj.out_mask.sum() == 24
        q_mask, k_mask = attention.q_proj.out_mask.view(4, 8), attention.k_proj.out_mask.view(2, 8)
        assert torch.equal(q_mask, k_mask.repeat_interleave(2, dim=0)), "q and k keep other channels"
        if not whole_heads:  # rotary embeddings turn channel j with j + head_dim/2
            assert torch.equal(k_mask[:, :4], k_mask[:, 4:])
        else:
            assert k_mask.all(1).sum() == 1 and not k_mask.any(1).all()
    oracle = dense_oracle(model)
    with torch.no_grad():
        pruned = model(**inputs).logits
        assert (pruned - unpruned).abs().max() > 1e-3, "pruning changed nothing"
        assert_close(pruned, oracle(**inputs).logits, f"llama, whole_heads={whole_heads}: pruned vs dense oracle")


@pytest.mark.timeout(300)  # a guard against the group search never ending, not a speed check
def test_wider_llama_groups_are_found():
    model, inputs = llama(layers=4, hidden=256, heads=8, kv_heads=4, intermediate=688)
    groups = channel_groups(model, inputs)
    assert [g.size for g in groups] == [4, 688] * 4
    assert [type(g) is AttentionGroup for g in groups] == [True, False] * 4


def test_gpt2_conv1d_layers_are_in_no_group(caplog):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                     use_cache=False, tie_word_embeddings=False, attn_implementation="eager")
    model = spa_kernels.convert(transformers.GPT2LMHeadModel(config).eval(), rank=2)
    conv1d = [name for name, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 8, "GPT-2's Conv1D layers are expected to stay unconverted"
    assert [name for name, m in model.named_modules() if isinstance(m, SPLoRALinear)] == ["lm_head"]
    with caplog.at_level("DEBUG", logger="spa_kernels"):
        groups = channel_groups(model, {"input_ids": torch.randint(VOCAB, (2, 7))})
    # lm_head writes the logits; every other channel passes through a Conv1D, which no mask reaches
    assert groups == []
    assert "channels of lm_head not prunable: its channels are a model output" in caplog.text
