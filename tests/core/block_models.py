"""Tiny models with blocks, for the block-discovery and block-reconstruction tests."""

from __future__ import annotations

import torch
from torch import nn

from adaround_core.demo.models import ResBlock, TinyResNet  # noqa: F401 - the tests import them here
from examples.minilm.bert import BertShape, SentenceEncoder


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise, 1x1 project; the input added back
    only when stride and width allow it."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 2) -> None:
        super().__init__()
        hidden = cin * expand
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1))
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class TinyMobileNet(nn.Module):
    """Stem conv, a stride-2 inverted residual (no shortcut), one with a shortcut, a head."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU6(),
            InvertedResidual(width, 2 * width, stride=2),
            InvertedResidual(2 * width, 2 * width, stride=1))
        self.classifier = nn.Linear(2 * width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


TINY_BERT = BertShape(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                      intermediate_size=32, max_positions=16)


def tiny_bert(seed: int = 0) -> SentenceEncoder:
    """examples.minilm's encoder with 2 layers of width 16 (random weights)."""
    torch.manual_seed(seed)
    return SentenceEncoder(TINY_BERT).eval()


def bert_batches(n: int, batch: int = 4, length: int = 6, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, TINY_BERT.vocab_size, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.int64)
        mask[0, length // 2:] = 0  # one padded sentence
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches
