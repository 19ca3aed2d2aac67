"""Cached samples of one layer: its quantized-model inputs and float-model outputs.

Samples are the slices along dim 0 of what the layer saw (images for a Conv,
batch or sequence entries for a Linear). A fixed share is held out for judging
the rounding; the rest is drawn at random (with repeats) for optimisation.
Tensors of different shapes (a layer called at several resolutions) form groups.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Protocol

import torch

logger = logging.getLogger(__name__)


class LayerSamples(Protocol):
    """What the per-layer AdaRound routine needs from a sample store."""

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random training samples ``(inputs, targets)``."""

    def holdout(self, chunk: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Held-out samples in chunks of at most ``chunk``."""

    @property
    def default_batch_size(self) -> int:
        """Samples per calibration batch."""


class _Group:
    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, holdout: int,
                 generator: torch.Generator) -> None:
        order = torch.randperm(inputs.shape[0], generator=generator).to(inputs.device)
        held, train = order[:holdout], order[holdout:]
        self.train_x, self.train_y = inputs[train], targets[train]
        self.held_x, self.held_y = inputs[held], targets[held]


class InMemoryLayerSamples:
    """A :class:`LayerSamples` holding every sample on the model's device."""

    def __init__(self, inputs: list[torch.Tensor], targets: list[torch.Tensor],
                 holdout_fraction: float, generator: torch.Generator) -> None:
        if not inputs:
            raise ValueError("no samples were captured for this layer")
        self._default_batch_size = inputs[0].shape[0]
        by_shape: dict[tuple, list[int]] = {}
        for i, x in enumerate(inputs):
            by_shape.setdefault(tuple(x.shape[1:]), []).append(i)
        self._groups = []
        for idx in by_shape.values():
            x = torch.cat([inputs[i] for i in idx])
            y = torch.cat([targets[i] for i in idx])
            held = int(round(holdout_fraction * x.shape[0])) if x.shape[0] > 1 else 0
            self._groups.append(_Group(x, y, min(held, x.shape[0] - 1), generator))
        self._weights = torch.tensor([float(g.train_x.shape[0]) for g in self._groups])
        if not any(g.held_x.shape[0] for g in self._groups):
            logger.warning("too few samples to hold any out: the rounding is judged on "
                           "the samples it was optimised on")
            for g in self._groups:
                g.held_x, g.held_y = g.train_x, g.train_y

    @property
    def default_batch_size(self) -> int:
        return self._default_batch_size

    @property
    def num_samples(self) -> int:
        return sum(g.train_x.shape[0] + g.held_x.shape[0] for g in self._groups)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        g = self._groups[0] if len(self._groups) == 1 else \
            self._groups[int(torch.multinomial(self._weights, 1, generator=generator))]
        idx = torch.randint(g.train_x.shape[0], (batch_size,), generator=generator)
        idx = idx.to(g.train_x.device)
        return g.train_x.index_select(0, idx), g.train_y.index_select(0, idx)

    def holdout(self, chunk: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for g in self._groups:
            for start in range(0, g.held_x.shape[0], chunk):
                yield g.held_x[start:start + chunk], g.held_y[start:start + chunk]
