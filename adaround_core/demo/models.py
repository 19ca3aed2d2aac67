"""The demo's float models: a small Conv-BN-ReLU network with a residual add, and a tiny
ResNet whose residual blocks are what ``granularity: block`` reconstructs."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """Three Conv-BN-ReLU blocks (one residual), pooling, and a two-layer head."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.fc1 = nn.Linear(2 * width * 16, 64)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.head(x)


class ResBlock(nn.Module):
    """BasicBlock-like: two 3x3 convs, the input added back (a 1x1 projection when the
    width changes)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(torch.relu(self.conv1(x)))
        out += self.shortcut(x)
        return torch.relu(out)


class TinyResNet(nn.Module):
    """Stem conv, a stage of two residual blocks, pooling and a Linear head."""

    def __init__(self, width: int = 8, in_channels: int = 3, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.stage = nn.Sequential(ResBlock(width, width), ResBlock(width, 2 * width))
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage(torch.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))
