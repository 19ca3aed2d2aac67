"""``data.source``'s two kinds of result, and the batches every stage streams from them.

* ``tensors`` (the bundled digits default): a dict ``train_x, train_y, calib_x, test_x,
  test_y`` of tensors; the data stage copies it into one safetensors file.
* ``datasets``: a dict ``{"calibration": ..., "evaluation": ..., "train": ... (optional)}``
  whose values are map-style ``torch.utils.data.Dataset``\\ s or ``DataLoader``\\ s. Nothing
  is copied: each stage calls the source again and streams batches from it. A sample (a
  batch once collated) is the model's input, as the engine's ``call_model`` takes it: a
  tensor, a tuple/list (positional arguments) or a dict (keyword arguments);
  ``data.batch_process`` turns other batches (``(input, label)``) into the model's input.

The calibration set is the first ``calibration.num_samples`` samples, in
``calibration.batch_size`` batches, in the source's order. :class:`RowDigest` hashes
samples independently of how they are batched, so the data stage's manifest (and, through
it, every layer's key) changes exactly when the data does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler

from adaround_core.calibration.batches import to_device
from adaround_core.torch_private import tree_leaves, tree_map
from tasks.io import import_object
from tasks.params import PipelineParams

TENSOR_KEYS = ("train_x", "train_y", "calib_x", "test_x", "test_y")
SPLITS = ("calibration", "evaluation")  # required splits of a ``datasets`` source
OPTIONAL_SPLITS = ("train",)


class DataSourceError(ValueError):
    """A ``data.source`` result that breaks the data contract."""

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"data.source {source!r}: {problem}")


def call_source(params: PipelineParams) -> Any:
    """``data.source(**data.kwargs)``; an exception of the source is one line naming it."""
    source = params.data.source
    try:
        return import_object(source)(**params.data.kwargs)
    except DataSourceError:
        raise
    except Exception as err:  # the user's code: any failure is the source's
        raise DataSourceError(source, f"failed: {type(err).__name__}: {first_line(err)}"
                              ) from None


def source_kind(result: object, source: str) -> str:
    """``"datasets"`` or ``"tensors"``; anything else is a :class:`DataSourceError`."""
    if isinstance(result, dict) and any(k in result for k in SPLITS):
        return "datasets"
    if isinstance(result, dict) and any(k in result for k in TENSOR_KEYS):
        return "tensors"
    got = f"a dict with keys {sorted(map(str, result))}" if isinstance(result, dict) else \
        type(result).__name__
    raise DataSourceError(source, f"returned {got}; return {{'calibration': Dataset, "
                                  f"'evaluation': Dataset}} (optional 'train'), or the tensors "
                                  f"{', '.join(TENSOR_KEYS)}")


def check_splits(result: dict, source: str) -> None:
    """Both splits are there, each a non-empty map-style Dataset or a DataLoader that does
    not shuffle (every stage must see the same samples in the same order)."""
    for split in SPLITS:
        if split not in result:
            raise DataSourceError(source, f"returned no {split!r}; the dict needs "
                                          f"{' and '.join(map(repr, SPLITS))}")
    unknown = sorted(set(result) - set(SPLITS) - set(OPTIONAL_SPLITS))
    if unknown:
        raise DataSourceError(source, f"returned unknown key {unknown[0]!r}; the keys are "
                                      f"{', '.join(SPLITS + OPTIONAL_SPLITS)}")
    for split in SPLITS:
        _check_split(result[split], split, source)


def _check_split(value: object, split: str, source: str) -> None:
    if isinstance(value, DataLoader):
        if isinstance(value.sampler, RandomSampler):
            raise DataSourceError(source, f"{split}: the DataLoader shuffles; every stage must "
                                          f"see the same samples in the same order: pass "
                                          f"shuffle=False")
        return
    if isinstance(value, IterableDataset) or not isinstance(value, Dataset) \
            or not hasattr(value, "__len__"):
        raise DataSourceError(source, f"{split} is {type(value).__name__}, not a map-style "
                                      f"torch.utils.data.Dataset (with __len__ and "
                                      f"__getitem__) or a DataLoader")
    if len(value) == 0:
        raise DataSourceError(source, f"{split} is empty; it needs at least one sample")


def loader(value: Dataset | DataLoader, batch_size: int) -> DataLoader:
    """A Dataset in ``batch_size`` batches, in order; a DataLoader as it is."""
    if isinstance(value, DataLoader):
        return value
    return DataLoader(value, batch_size=batch_size, shuffle=False)


def rows(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor."""
    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return len(leaf)
    raise ValueError(f"a batch of {describe(batch)} holds no batched tensor")


def first_rows(batch: Any, count: int) -> Any:
    """The first ``count`` samples of every tensor of ``batch``."""
    return tree_map(lambda t: t[:count] if isinstance(t, torch.Tensor) and t.dim() else t,
                    batch)


def to_cpu(batch: Any) -> Any:
    """Every tensor of ``batch`` on the CPU."""
    return tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, batch)


def head(batches: Iterable[Any], num_samples: int) -> Iterator[Any]:
    """The batches holding the first ``num_samples`` samples (the last one cut)."""
    left = num_samples
    for batch in batches:
        if left <= 0:
            return
        size = rows(batch)
        yield batch if size <= left else first_rows(batch, left)
        left -= size


def describe(batch: Any) -> Any:
    """The structure of one sample of ``batch``: ``"float32[1, 8, 8]"``, a list or a dict."""
    if isinstance(batch, torch.Tensor):
        return f"{str(batch.dtype).removeprefix('torch.')}{list(batch.shape[1:])}"
    if isinstance(batch, dict):
        return {str(k): describe(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return [describe(v) for v in batch]
    return type(batch).__name__


class RowDigest:
    """SHA-256 of samples, one row after another (the same for any batch size), and their
    count. Only tensors are hashed: their dtype, sample shape and bytes."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.samples = 0

    def update(self, batch: Any) -> None:
        leaves = [t.detach().cpu().contiguous() for t in tree_leaves(batch)
                  if isinstance(t, torch.Tensor) and t.dim() > 0]
        for i in range(rows(batch)):
            for leaf in leaves:
                row = leaf[i]
                self._hash.update(f"{row.dtype}{tuple(row.shape)}".encode())
                if row.numel():
                    self._hash.update(row.reshape(-1).view(torch.uint8).numpy())  # no copy
        self.samples += rows(batch)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class DeviceBatches:
    """A re-iterable view of a loader whose batches arrive on ``device``."""

    def __init__(self, batches: Iterable[Any], device: torch.device) -> None:
        self.batches, self.device = batches, device

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.batches):
            yield to_device(batch, self.device, i)

    def __len__(self) -> int:
        return len(self.batches)


def batch_processor(params: PipelineParams):
    """``data.batch_process`` (batch -> model input), or the identity."""
    spec = params.data.batch_process
    return import_object(spec) if spec else (lambda batch: batch)


def first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
