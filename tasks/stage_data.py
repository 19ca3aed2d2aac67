"""The data a stage works on, as the data stage's manifest describes it.

A ``tensors`` dataset is read from its safetensors file; a ``datasets`` source is called
again and streamed, and its calibration samples are checked against the manifest's digest
(data that changed since the data stage ran is an error, not a silent mix).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from adaround_core.calibration.batches import to_device
from tasks.artifacts import Artifact
from tasks.datasets import (
    DataSourceError,
    DeviceBatches,
    RowDigest,
    batch_processor,
    call_source,
    head,
    loader,
    source_kind,
)
from tasks.io import load_tensors, read_json
from tasks.params import PipelineParams


class TensorBatches:
    """``(x, y)`` slices of two tensors, ``batch_size`` rows each, in order."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.x), self.batch_size):
            yield self.x[start:start + self.batch_size], self.y[start:start + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)


class CalibrationBatches(Sequence):
    """A ``datasets`` source's calibration batches, read from the source each time they are
    iterated (never all in memory: a 224 px image set of 1024 samples is 0.6 GB); item
    ``i`` reads the first ``i + 1`` batches. ``num_samples`` and the length are the data
    stage's counts (a manifest without the batch count is counted once)."""

    def __init__(self, data: StageData, device: torch.device) -> None:
        self.data, self.device = data, device
        self.num_samples = data.manifest["calibration"]["samples"]
        self._len: int | None = data.manifest["calibration"].get("batches")

    def __iter__(self) -> Iterator[Any]:
        count = 0
        for batch in self.data.stream_calibration(self.device):
            count += 1
            yield batch
        self._len = count

    def __len__(self) -> int:
        if self._len is None:
            self._len = sum(1 for _ in self)
        return self._len

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return list(self)[index]
        if index < 0:
            index += len(self)
        for i, batch in enumerate(self):
            if i == index:
                return batch
        raise IndexError(f"calibration batch {index} out of range")


class StageData:
    """One dataset artifact (the manifest) opened for a stage."""

    def __init__(self, params: PipelineParams, dataset: Artifact) -> None:
        self.params, self.path = params, dataset.file
        self.manifest = read_json(dataset.file)
        self.kind = self.manifest["kind"]
        if self.kind == "tensors":
            self._tensors = load_tensors(self.path.parent / self.manifest["tensors"]["file"])
        else:
            self._source = call_source(params)
            source_kind(self._source, params.data.source)
        self._process = batch_processor(params) if self.kind == "datasets" else None

    def calibration(self, device: torch.device) -> Sequence[Any]:
        """The calibration set as model inputs on ``device``, in ``calibration.batch_size``
        batches: a list for tensors, else :class:`CalibrationBatches` (streamed)."""
        cfg = self.params.calibration
        if self.kind == "tensors":
            calib = self._tensors["calib_x"][: cfg.num_samples].to(device)
            return list(calib.split(cfg.batch_size))
        return CalibrationBatches(self, device)

    def stream_calibration(self, device: torch.device) -> Iterator[Any]:
        """The source's calibration batches, processed, on ``device``, one at a time; after
        the last one, checked against the manifest's digest."""
        cfg = self.params.calibration
        digest = RowDigest()
        for i, batch in enumerate(head(loader(self._source["calibration"], cfg.batch_size),
                                       cfg.num_samples)):
            digest.update(batch)
            yield to_device(self._process(batch), device, i)
        self._check_unchanged("calibration", digest)

    def _check_unchanged(self, split: str, digest: RowDigest) -> None:
        if digest.hexdigest() != self.manifest[split]["sha256"]:
            raise DataSourceError(self.params.data.source,
                                  f"the {split} samples differ from those the data stage "
                                  f"recorded in {self.path}; rerun `python -m flows data` "
                                  f"(under DVC: list the data's files in the data stage's "
                                  f"deps)")

    def evaluation(self, device: torch.device | str = "cpu") -> DeviceBatches:
        """The evaluation batches as the source gives them (digits: ``(x, y)``), on
        ``device``: what ``eval.metric`` gets."""
        size = self.params.eval.batch_size
        if self.kind == "tensors":
            batches = TensorBatches(self._tensors["test_x"], self._tensors["test_y"], size)
        else:
            batches = loader(self._source["evaluation"], size)
        return DeviceBatches(batches, torch.device(device))

    def model_input(self, batch: Any) -> Any:
        """The model's input in an evaluation batch (digits: the images of ``(x, y)``)."""
        return batch[0] if self.kind == "tensors" else self._process(batch)

    def training(self) -> Any:
        """What ``train.trainer`` gets: the tensors, or the source's dict of splits."""
        return self._tensors if self.kind == "tensors" else self._source


def open_data(params: PipelineParams, dataset: Artifact) -> StageData:
    """The data of ``dataset`` (the data stage's manifest)."""
    if not Path(dataset.path).is_file():
        raise FileNotFoundError(f"{dataset.path} does not exist: run `python -m flows data`")
    return StageData(params, dataset)
