"""A layer's cached samples: its quantized-model inputs and float-model outputs.

Samples are the rows (slices along dim 0) of what the layer saw: images for a
Conv, batch or sequence entries for a Linear. Rows of different shapes (a layer
called at several resolutions) form separate groups. A fixed share of each group
is held out to judge the rounding; the rest is drawn at random, with repeats, for
optimisation. The rows live in a :mod:`~adaround_core.calibration.sample_store` (memory or
disk): the split and the sampling are the same either way, so a given seed draws
the same samples from both.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from adaround_core.calibration.sample_store import RowStore, TensorStore, cached_groups

logger = logging.getLogger(__name__)

HOLDOUT_CHUNK = 256  # held-out samples judged per forward call, at most ...
HOLDOUT_CHUNK_BYTES = 64 << 20  # ... of this many bytes of inputs and targets


class _Group:
    """Inputs and targets of one row shape, split into training and held-out rows."""

    def __init__(self, inputs: RowStore, targets: RowStore, holdout_fraction: float,
                 generator: torch.Generator) -> None:
        n = inputs.num_rows
        held = min(int(round(holdout_fraction * n)), n - 1) if n > 1 else 0
        order = torch.randperm(n, generator=generator)
        self.inputs, self.targets = inputs, targets
        self.held, self.train = order[:held], order[held:]

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs.gather(index), self.targets.gather(index)

    def advise(self, index: torch.Tensor) -> None:
        self.inputs.advise(index)
        self.targets.advise(index)


class LayerSamples:
    """Training draws and held-out chunks over groups of ``(inputs, targets)`` stores."""

    def __init__(self, groups: list[tuple[RowStore, RowStore]], holdout_fraction: float,
                 generator: torch.Generator, default_batch_size: int) -> None:
        if not groups:
            raise ValueError("no samples were captured for this layer")
        self.default_batch_size = default_batch_size
        self._groups = [_Group(x, y, holdout_fraction, generator) for x, y in groups]
        self._weights = torch.tensor([float(len(g.train)) for g in self._groups])
        if not any(len(g.held) for g in self._groups):
            logger.warning("too few samples to hold any out: the rounding is judged on "
                           "the samples it was optimised on")
            for g in self._groups:
                g.held = g.train

    @classmethod
    def from_tensors(cls, inputs: list[torch.Tensor], targets: list[torch.Tensor],
                     holdout_fraction: float, generator: torch.Generator) -> LayerSamples:
        """Samples held in memory, from per-batch input and target tensors."""
        if not inputs:
            raise ValueError("no samples were captured for this layer")
        by_shape: dict[tuple, list[int]] = {}
        for i, x in enumerate(inputs):
            by_shape.setdefault(tuple(x.shape[1:]), []).append(i)
        groups = [(TensorStore(torch.cat([inputs[i] for i in idx])),
                   TensorStore(torch.cat([targets[i] for i in idx]))) for idx in by_shape.values()]
        return cls(groups, holdout_fraction, generator, inputs[0].shape[0])

    @classmethod
    def from_cache(cls, directory: Path, holdout_fraction: float, generator: torch.Generator,
                   device: torch.device | str = "cpu") -> LayerSamples:
        """Samples read from a disk cache written by
        :func:`~adaround_core.calibration.sample_store.write_layer_cache` (memory stays flat)."""
        groups = cached_groups(Path(directory), device)
        first_batch = groups[0][0].shards[0].rows
        return cls(groups, holdout_fraction, generator, first_batch)

    @property
    def num_samples(self) -> int:
        return sum(g.inputs.num_rows for g in self._groups)

    def train_row_shapes(self) -> list[tuple[tuple[int, ...], int]]:
        """``(row shape, number of training rows)`` of each group."""
        return [(tuple(g.inputs.row_shape), len(g.train)) for g in self._groups]

    def sample(self, batch_size: int, generator: torch.Generator,
               part: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random training rows ``(inputs, targets)``; with ``part``
        (``start, stop``) only that slice of them, drawn with the same random numbers (one
        rank's share of a data-parallel batch)."""
        group, index = self._draw(batch_size, generator, part)
        return group.rows(index)

    def draws(self, count: int, batch_size: int, generator: torch.Generator,
              part: tuple[int, int] | None = None,
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``count`` successive :meth:`sample` draws, the same rows in the same order. From
        a disk cache each batch's indices are drawn one step ahead and the kernel asked to
        read those rows ahead (:meth:`RowStore.advise`); the rows are read when yielded. (A
        reader thread cost more than it hid: its copies and page faults, beside the caller's
        two-thread kernels on a 2-core machine, made a 224-px step 10-25 % slower.)"""
        if all(isinstance(g.inputs, TensorStore) for g in self._groups):
            for _ in range(count):
                yield self.sample(batch_size, generator, part)
            return
        planned = itertools.chain(
            (self._draw(batch_size, generator, part) for _ in range(count)), [None])
        for (group, index), following in itertools.pairwise(planned):
            if following is not None:  # drawn one step ahead: the generator's order holds
                following[0].advise(following[1])
            yield group.rows(index)

    def _draw(self, batch_size: int, generator: torch.Generator,
              part: tuple[int, int] | None) -> tuple[_Group, torch.Tensor]:
        """The group and row indices of one :meth:`sample` draw."""
        g = self._groups[0] if len(self._groups) == 1 else \
            self._groups[int(torch.multinomial(self._weights, 1, generator=generator))]
        idx = torch.randint(len(g.train), (batch_size,), generator=generator)
        if part is not None:
            idx = idx[part[0]:part[1]]
        return g, g.train[idx]

    def holdout(self, chunk: int = HOLDOUT_CHUNK, max_bytes: int | None = HOLDOUT_CHUNK_BYTES,
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Held-out rows in chunks of at most ``chunk`` rows and (unless ``max_bytes`` is
        None) of at most that many bytes of inputs and targets (at least one row), so the
        memory of judging a unit does not grow with the number of samples."""
        for g in self._groups:
            rows = chunk
            if max_bytes is not None:
                row_bytes = g.inputs.row_nbytes + g.targets.row_nbytes
                rows = max(1, min(chunk, max_bytes // max(row_bytes, 1)))
            for start in range(0, len(g.held), rows):
                yield g.rows(g.held[start:start + rows])
