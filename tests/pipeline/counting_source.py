"""A test data source: digits as map-style Datasets, the calibration split counting the
samples read."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset

from adaround_core.demo.digits import digits_dataset

READS: list[int] = []  # calibration sample indices read, in order


class CountingImages(Dataset):
    """``(image, label)`` pairs; every read is recorded in READS."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        READS.append(index)
        return self.images[index], self.labels[index]


def splits(num_calibration: int = 64) -> dict[str, Dataset]:
    data = digits_dataset(num_calibration=num_calibration)
    return {"calibration": CountingImages(data["calib_x"], torch.zeros(len(data["calib_x"]), dtype=torch.long)),
            "evaluation": TensorDataset(data["test_x"], data["test_y"])}


def images(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``data.batch_process``: the model's input of an ``(images, labels)`` batch."""
    return batch[0]
