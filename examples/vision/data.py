"""Data source: random crops of scikit-learn's two bundled photos, ImageNet-normalised."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_AREA = (0.08, 1.0)         # torchvision RandomResizedCrop's defaults
CROP_RATIO = (3 / 4, 4 / 3)
JITTER = 0.4                    # brightness / contrast / saturation, as in ImageNet training
SPLIT_STREAMS = {"calibration": 1, "evaluation": 2, "train": 3}  # disjoint random streams
_STREAM_STRIDE = 1_000_003      # a prime: (seed, stream, index) never share a generator seed


@lru_cache(maxsize=1)
def sample_photos() -> tuple[torch.Tensor, ...]:
    """``china.jpg`` and ``flower.jpg`` of ``sklearn.datasets.load_sample_images`` as float
    ``[3, H, W]`` tensors in [0, 1] (shipped with scikit-learn; reading them needs Pillow)."""
    from sklearn.datasets import load_sample_images

    return tuple(torch.from_numpy(img.copy()).permute(2, 0, 1).float().div(255)
                 for img in load_sample_images().images)


class PhotoCrops(Dataset):
    """``length`` random crops, each ``[3, image_size, image_size]`` float32; sample ``i`` is
    the same on every access (its own generator seeded by ``seed``, ``stream`` and ``i``)."""

    def __init__(self, length: int, image_size: int = 224, seed: int = 0,
                 stream: int = 0) -> None:
        if length < 1 or image_size < 8:
            raise ValueError(f"PhotoCrops(length={length}, image_size={image_size}): "
                             "need length >= 1 and image_size >= 8")
        self.length, self.image_size, self.seed, self.stream = length, image_size, seed, stream

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.length:
            raise IndexError(f"PhotoCrops index {index} out of range 0..{self.length - 1}")
        g = torch.Generator().manual_seed(
            (self.seed * _STREAM_STRIDE + self.stream) * _STREAM_STRIDE + index)
        photos = sample_photos()
        photo = photos[int(torch.randint(len(photos), (1,), generator=g))]
        # one thread: antialiased resizing sums in another order on more threads, and a
        # sample must be the same bits in every process (the pipeline checks its digest)
        with _one_thread():
            image = _jitter(_flip(_random_crop(photo, self.image_size, g), g), g)
            return _normalise(image)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch's intra-op threads set to 1 inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def photo_crops(num_calibration: int = 64, num_evaluation: int = 256, image_size: int = 224,
                seed: int = 0, num_train: int = 0) -> dict[str, Dataset]:
    """``{"calibration", "evaluation"}`` (and ``"train"`` when ``num_train``): crops from
    disjoint random streams (the same two photos underlie all splits)."""
    sizes = {"calibration": num_calibration, "evaluation": num_evaluation}
    if num_train:
        sizes["train"] = num_train
    return {split: PhotoCrops(n, image_size, seed, SPLIT_STREAMS[split])
            for split, n in sizes.items()}


def _random_crop(photo: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    _, height, width = photo.shape
    area = height * width * _uniform(*CROP_AREA, g)
    ratio = math.exp(_uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), g))
    w = min(width, max(1, round(math.sqrt(area * ratio))))
    h = min(height, max(1, round(math.sqrt(area / ratio))))
    top = int(torch.randint(height - h + 1, (1,), generator=g))
    left = int(torch.randint(width - w + 1, (1,), generator=g))
    crop = photo[:, top:top + h, left:left + w].unsqueeze(0)
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).squeeze(0)


def _flip(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return image.flip(-1) if _uniform(0.0, 1.0, g) < 0.5 else image


def _jitter(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    brightness, contrast, saturation = (_uniform(1 - JITTER, 1 + JITTER, g) for _ in range(3))
    image = image * brightness
    gray = image.mean(dim=0, keepdim=True)
    image = (image - gray.mean()) * contrast + gray.mean()
    gray = image.mean(dim=0, keepdim=True)
    image = (image - gray) * saturation + gray
    return image.clamp(0.0, 1.0)


def _normalise(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image - mean) / std).contiguous()


def _uniform(low: float, high: float, g: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))
