"""Whole models as users run them, small: a torch encoder with a head, and Hugging Face ViT/BERT/ResNet from configs.

The Hugging Face models are built from a config with random weights (nothing is
downloaded); they are ``None`` where ``transformers`` is not installed.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor, nn

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


class EncoderClassifier(nn.Module):
    """Token embedding + learned position embedding + class token → torch encoder → norm → head."""

    def __init__(self, vocab: int = 20, width: int = 16, heads: int = 2, layers: int = 2, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(1, 9, width) * 0.02)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position[:, : x.shape[1] + 1]
        return self.head(self.norm(self.encoder(x))[:, 0])


def encoder_input(batch: int = 2, length: int = 8) -> Tensor:
    return torch.randint(0, 20, (batch, length))


def hf_vit() -> nn.Module | None:
    if not HAS_TRANSFORMERS:
        return None
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, num_labels=3,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(config).eval()


def hf_vit_input(batch: int = 2) -> Tensor:
    return torch.randn(batch, 3, 16, 16)


def hf_bert() -> nn.Module | None:
    if not HAS_TRANSFORMERS:
        return None
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def hf_bert_input(batch: int = 2, length: int = 7) -> Tensor:
    return torch.randint(0, 40, (batch, length))


def hf_resnet() -> nn.Module | None:
    if not HAS_TRANSFORMERS:
        return None
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                          num_labels=3)
    return ResNetForImageClassification(config).eval()


def hf_resnet_input(batch: int = 2) -> Tensor:
    return torch.randn(batch, 3, 16, 16)


def logits(output: object) -> Tensor:
    """A Hugging Face model's logits, or a plain model's output as it is."""
    return output.logits if hasattr(output, "logits") else output
