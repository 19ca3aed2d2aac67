"""A ResNet-18-shaped stack built from ``torch.nn`` only, and its layers' input shapes.

BatchNorms are left out: ``prepare_qat_fx`` folds them into the convolutions anyway, so
the rounded layers and their shapes are those of a real ResNet-18 (torchvision's
layout: 7x7/2 stem, max-pool, four stages of two basic blocks, 1x1/2 shortcuts, fc).
"""

from __future__ import annotations

import torch
from torch import nn

STAGE_WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.downsample = nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout \
            else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + skip)


class ResNet18Like(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3)
        self.pool = nn.MaxPool2d(3, 2, 1)
        blocks, cin = [], 64
        for i, width in enumerate(STAGE_WIDTHS):
            blocks += [BasicBlock(cin, width, 1 if i == 0 else 2), BasicBlock(width, width, 1)]
            cin = width
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.pool(torch.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def layer_row_shapes(model: nn.Module, size: int) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """``(name, layer, input row shape)`` of every Conv/Linear, in call order, for one
    ``3 x size x size`` image."""
    found: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, name=name: found.append((name, mod, tuple(args[0].shape[1:]))))
        for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return found
