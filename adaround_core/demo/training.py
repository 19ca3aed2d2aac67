"""Training and evaluation helpers of the demo model."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 30,
                     batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> nn.Module:
    """Train ``model`` with Adam and cross-entropy; returns it in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        logger.debug("epoch %d loss %.4f", epoch, loss.item())
    return model.eval()


def train_on_dataset(model: nn.Module, dataset: dict[str, torch.Tensor], *, seed: int,
                     epochs: int = 30, batch_size: int = 64, lr: float = 3e-3) -> nn.Module:
    """The pipeline's ``train.trainer`` of the demo: :func:`train_classifier` on the
    dataset's ``train_x`` / ``train_y``."""
    return train_classifier(model, dataset["train_x"], dataset["train_y"], epochs=epochs,
                            batch_size=batch_size, lr=lr, seed=seed)


@torch.no_grad()
def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        correct += (model(x[start:start + batch_size]).argmax(1) == y[start:start + batch_size]).sum().item()
    return 100.0 * correct / len(x)


@torch.no_grad()
def top1_metric(model: nn.Module, loader, *, float_model: nn.Module | None = None
                ) -> dict[str, float]:
    """The pipeline's ``eval.metric`` of the demo: top-1 accuracy in percent over ``(x, y)``
    batches (the same sums as :func:`top1`)."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return {"top1": 100.0 * correct / total}
