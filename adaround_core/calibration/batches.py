"""Calibration batches: processing, device placement, validation, and calling the model.

A processed batch that is a tuple or list is passed to the model as positional
arguments, a dict as keyword arguments, anything else as the single argument.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from adaround_core.torch_private import tree_leaves, tree_map


def call_model(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one processed batch."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def indexed_device(device: torch.device | str) -> torch.device:
    """``device`` with its index: ``cuda`` is the current CUDA device, as tensors name it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def to_device(batch: Any, device: torch.device, index: int) -> Any:
    """Move CPU tensors of ``batch`` to ``device``; a tensor on another accelerator is an error."""
    device = indexed_device(device)

    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.device == device:
            return t
        if t.device.type != "cpu":
            raise ValueError(f"batch {index} holds a tensor on {t.device} but the model is on "
                             f"{device}; move the batch (or the model) first")
        return t.to(device, non_blocking=True)

    return tree_map(move, batch)


def check_finite(batch: Any, index: int) -> None:
    """Raise if any floating-point tensor of ``batch`` holds NaN or Inf."""
    for t in tree_leaves(batch):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"batch {index} contains NaN or Inf values")


class CalibrationBatches:
    """Re-iterable source of processed, validated batches on the model's device.

    A list/tuple is processed, checked and moved to the device once (fast path);
    any other iterable (a DataLoader) is streamed, ``num_batches`` of it per pass.
    """

    def __init__(self, batches: Iterable, process: Callable | None, device: torch.device,
                 num_batches: int) -> None:
        self._process = process or (lambda b: b)
        self._device = device
        self._num_batches = num_batches
        self._expected: int | None = None
        if isinstance(batches, torch.Tensor):
            raise TypeError(f"batches is one tensor of shape {tuple(batches.shape)}; pass a "
                            f"list of batches (e.g. list(x.split(32))) or a DataLoader")
        if isinstance(batches, (list, tuple)):
            if len(batches) == 0:
                raise ValueError("batches is empty: give at least one calibration batch")
            self._cached: list | None = [self._prepare(b, i) for i, b in enumerate(batches)]
            self._source = None
        elif isinstance(batches, Iterable):
            self._cached, self._source = None, batches
        else:
            raise TypeError(f"batches must be a list, tuple or DataLoader, "
                            f"got {type(batches).__name__}")

    def _prepare(self, raw: Any, index: int) -> Any:
        batch = to_device(self._process(raw), self._device, index)
        check_finite(batch, index)
        return batch

    def __iter__(self) -> Iterator[Any]:
        if self._cached is not None:
            yield from self._cached
            return
        count = 0
        for i, raw in enumerate(itertools.islice(self._source, self._num_batches)):
            count += 1
            yield self._prepare(raw, i)
        self._check_pass_length(count)

    def _check_pass_length(self, count: int) -> None:
        if self._expected is not None and count < self._expected:
            raise ValueError("batches yielded fewer batches on a later pass; pass a list or a "
                             "re-iterable DataLoader, not a one-shot iterator")
        if count == 0:
            raise ValueError("batches is empty: the DataLoader yielded no batch")
        self._expected = count

    def check_all(self) -> None:
        """Read every batch once (a DataLoader: ``num_batches`` of it), so that bad data
        (NaN/Inf, wrong device, empty) fails before anything touches the model."""
        for _ in self:
            pass

    def first(self) -> Any:
        """The first processed batch."""
        if self._cached is not None:
            return self._cached[0]
        for batch in self:
            return batch
        raise ValueError("batches is empty")
