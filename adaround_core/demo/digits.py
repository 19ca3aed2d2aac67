"""The bundled ``sklearn.datasets.load_digits`` data as train / calibration / test tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


@dataclass(frozen=True)
class DigitsSplits:
    """Images are float32 ``(N, 1, 8, 8)`` scaled to [0, 1]; labels int64 ``(N,)``."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    calib_x: torch.Tensor
    calib_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_digits_splits(test_fraction: float = 0.3, num_calibration: int = 256,
                       seed: int = 0) -> DigitsSplits:
    """Stratified split of the 1797 digits; calibration samples come from the train part."""
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y)
    rng = np.random.default_rng(seed)
    calib = rng.choice(len(x_train), size=min(num_calibration, len(x_train)), replace=False)
    t = torch.from_numpy
    return DigitsSplits(t(x_train), t(y_train), t(x_train[calib]), t(y_train[calib]),
                        t(x_test), t(y_test))


def digits_dataset(test_fraction: float = 0.3, num_calibration: int = 256,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """The pipeline's data contract: ``train_x/train_y/calib_x/test_x/test_y`` tensors."""
    s = load_digits_splits(test_fraction, num_calibration, seed)
    return {"train_x": s.train_x, "train_y": s.train_y, "calib_x": s.calib_x,
            "test_x": s.test_x, "test_y": s.test_y}
