"""A converted model computes the same in every mode, and never as its unadapted base.

Every family below is converted, given non-zero adapters and random channel masks,
and run in train and eval mode × autograd on / ``no_grad`` / ``inference_mode`` ×
eager / ``torch.compile``.  PyTorch takes different code paths across these modes
(the transformer fast paths, nested tensors, ``nn.MultiheadAttention``'s native
kernel, dynamo's tracing); any path that skipped an SPA layer would compute the
plain base model there.  So each output must match the eager autograd output of the
same train/eval mode, and differ clearly from the base model's output in that mode.

Dropout is 0 everywhere, so train and eval agree except through batch norm; the
batch-norm families compare each mode with the reference of its own train/eval mode,
with the module state (running statistics) restored before every call.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable

import pytest
import torch
from torch import nn

import spa_kernels
from spa_kernels.nn import ChannelMasked

MODES = [(training, grad_mode) for training in (True, False) for grad_mode in ("grad", "no_grad", "inference_mode")]
# Smallest max-abs difference from the unadapted base that counts as "clearly adapted".
MIN_ADAPTER_EFFECT = 1e-2
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def _grad_context(grad_mode: str) -> contextlib.AbstractContextManager:
    return {"grad": contextlib.nullcontext, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[grad_mode]()


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def _residual_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), ResidualBlock(8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def _conv1d_net() -> nn.Module:
    return nn.Sequential(nn.Conv1d(4, 12, 5, padding=2), nn.BatchNorm1d(12), nn.ReLU(),
                         nn.Conv1d(12, 6, 3, stride=2), nn.Flatten(), nn.Linear(6 * 6, 3))


def _encoder(nested: bool) -> nn.Module:
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16), enable_nested_tensor=nested)


def _padding_mask() -> torch.Tensor:
    # Left-aligned padding, as the nested-tensor path requires before it packs the batch.
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[1, 4:] = True
    mask[2, 2:] = True
    return mask


class DecoderStack(nn.Module):
    """A decoder fed by a fixed memory, so the model takes one input like the others."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerDecoderLayer(16, 2, 24, dropout=0.0, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, 2)
        self.register_buffer("memory", torch.randn(3, 7, 16))

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.decoder(tgt, self.memory, tgt_mask=causal, tgt_is_causal=True)


class DecoderLayerAlone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(16, 4, 24, dropout=0.0, batch_first=True)
        self.register_buffer("memory", torch.randn(3, 5, 16))

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        return self.layer(tgt, self.memory)


# family -> (builder of the torch model, builder of (args, kwargs), whether batch norm makes train != eval)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[tuple, dict]], bool]] = {
    "encoder": (lambda: _encoder(nested=False),
                lambda: ((torch.randn(3, 6, 16),), {"src_key_padding_mask": _padding_mask()}), False),
    "encoder_nested": (lambda: _encoder(nested=True),
                       lambda: ((torch.randn(3, 6, 16),), {"src_key_padding_mask": _padding_mask()}), False),
    "encoder_layer": (lambda: nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, activation="gelu"),
                      lambda: ((torch.randn(2, 5, 16),), {}), False),
    "decoder_layer": (DecoderLayerAlone, lambda: ((torch.randn(3, 4, 16),), {}), False),
    "decoder": (DecoderStack, lambda: ((torch.randn(3, 4, 16),), {}), False),
    "residual_cnn": (_residual_cnn, lambda: ((torch.randn(4, 3, 8, 8),), {}), True),
    "conv1d_sppara": (_conv1d_net, lambda: ((torch.randn(4, 4, 13),), {}), True),
}


def _random_mask(size: int) -> torch.Tensor:
    mask = torch.rand(size) < 0.7
    mask[torch.randint(size, ())] = True  # at least one active channel
    return mask


def _adapt(base: nn.Module, family: str) -> nn.Module:
    """The converted model with non-zero adapters and random masks on every SPA layer."""
    logging.getLogger("spa_kernels").setLevel(logging.ERROR)  # the attention modules are left as they are
    conv_adapter = "sppara" if family.endswith("sppara") else "splora"
    model = spa_kernels.convert(base, rank=3, conv_adapter=conv_adapter)
    layers = [m for m in model.modules() if isinstance(m, ChannelMasked)]
    assert layers, f"{family}: nothing was converted"
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer.adapter, nn.Parameter):
                nn.init.normal_(layer.adapter, std=0.2)
            else:
                nn.init.normal_(layer.adapter.cols, std=0.2)
            layer.set_masks(in_mask=_random_mask(layer.in_mask.numel()), out_mask=_random_mask(layer.out_mask.numel()))
    return model


def _warm_batch_norm(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Give batch norms running statistics that are not the initial ones."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(*(a + 0.3 * torch.randn_like(a) for a in args), **kwargs)


def _run(model: nn.Module, module_for_mode: nn.Module, state: dict, args: tuple, kwargs: dict,
         training: bool, grad_mode: str) -> torch.Tensor:
    """One forward in the given mode; the state (batch-norm statistics) is restored afterwards."""
    module_for_mode.train(training)
    with _grad_context(grad_mode):
        out = model(*args, **kwargs)
    module_for_mode.load_state_dict(state)
    return out.detach().clone()


def _check_family(family: str, compiled: bool, backend: str = "aot_eager", modes=MODES, families=FAMILIES) -> None:
    build, make_inputs, has_batch_norm = families[family]
    base = build()
    args, kwargs = make_inputs()
    if has_batch_norm:
        _warm_batch_norm(base, args, kwargs)
    adapted = _adapt(base, family)
    base_state, adapted_state = copy.deepcopy(base.state_dict()), copy.deepcopy(adapted.state_dict())

    references = {training: _run(adapted, adapted, adapted_state, args, kwargs, training, "grad")
                  for training in (True, False)}
    if not has_batch_norm:
        torch.testing.assert_close(references[False], references[True], **TOLERANCE,
                                   msg=lambda m: f"{family}: eval differs from train\n{m}")

    runner = torch.compile(adapted, backend=backend) if compiled else adapted
    for training, grad_mode in modes:
        out = _run(runner, adapted, adapted_state, args, kwargs, training, grad_mode)
        base_out = _run(base, base, base_state, args, kwargs, training, grad_mode)
        where = f"{family}, {'train' if training else 'eval'}, {grad_mode}, {'compiled' if compiled else 'eager'}"
        torch.testing.assert_close(out, references[training], **TOLERANCE,
                                   msg=lambda m, where=where: f"{where}: differs from the eager autograd output\n{m}")
        effect = (out - base_out).abs().max().item()
        assert effect > MIN_ADAPTER_EFFECT, f"{where}: output equals the unadapted base (max diff {effect:.2e})"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_mode_agrees_eager(family):
    _check_family(family, compiled=False)


# Families with a torch fast path, plus one batch-norm network: compiling is slow on CPU.
COMPILED_FAMILIES = ["encoder", "encoder_nested", "encoder_layer", "decoder", "residual_cnn"]


@pytest.mark.parametrize("family", COMPILED_FAMILIES)
def test_every_mode_agrees_compiled(family):
    """Dynamo decides the code path at trace time, once per mode: each mode is traced."""
    torch.compiler.reset()
    _check_family(family, compiled=True)


def test_inference_modes_agree_with_inductor():
    """The default compiler, on the inference modes where PyTorch's fast paths would apply."""
    torch.compiler.reset()
    _check_family("encoder_nested", compiled=True, backend="inductor",
                  modes=[(False, "no_grad"), (False, "inference_mode")])


class Logits(nn.Module):
    """A Hugging Face model returning its first output tensor, like the torch families."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.model(*args, **kwargs)[0]


def _hugging_face_families() -> dict:
    transformers = pytest.importorskip("transformers")
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}

    def tokens() -> tuple[tuple, dict]:
        return (torch.randint(0, 50, (2, 7)),), {}

    return {
        "bert_masked_lm": (lambda: Logits(transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            **no_dropout))), tokens, False),
        "llama_tied_head": (lambda: Logits(transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True))), tokens, False),
        "vit": (lambda: Logits(transformers.ViTForImageClassification(transformers.ViTConfig(
            image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, num_labels=3, **no_dropout))), lambda: ((torch.randn(2, 3, 16, 16),), {}), False),
    }


@pytest.mark.parametrize("family", ["bert_masked_lm", "llama_tied_head", "vit"])
def test_hugging_face_models_agree_eager(family):
    """Eager only: compiling these on CPU takes minutes."""
    _check_family(family, compiled=False, families=_hugging_face_families())


def test_adapter_effect_is_measured_on_the_adapted_layers():
    """The check above is sensitive: with zero adapters and full masks, outputs equal the base."""
    build, make_inputs, _ = FAMILIES["encoder_nested"]
    base = build().eval()
    model = spa_kernels.convert(base, rank=3)
    for layer in model.modules():
        if isinstance(layer, ChannelMasked):
            nn.init.zeros_(layer.adapter.cols)
    args, kwargs = make_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(*args, **kwargs)[~kwargs["src_key_padding_mask"]],
                                   base(*args, **kwargs)[~kwargs["src_key_padding_mask"]], **TOLERANCE)
