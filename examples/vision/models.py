"""Model factories: torchvision's ResNet-18 and MobileNetV2, random weights (fixed seed)
whose BatchNorm statistics are measured on the photo crops, or a local state_dict."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from examples.vision.data import PhotoCrops
from examples.vision.torchvision_import import torchvision_models

BATCHNORM_STREAM = 4  # the crops that set BatchNorm statistics: none is a calibration or evaluation crop
BATCHNORM_BATCH = 16


def resnet18(num_classes: int = 1000, weights: str | None = None, seed: int = 0,
             batchnorm_images: int = 64, image_size: int = 224) -> nn.Module:
    """torchvision ``resnet18`` in eval mode; see :func:`build`."""
    return build("resnet18", num_classes, weights, seed, batchnorm_images, image_size)


def mobilenet_v2(num_classes: int = 1000, weights: str | None = None, seed: int = 0,
                 batchnorm_images: int = 64, image_size: int = 224) -> nn.Module:
    """torchvision ``mobilenet_v2`` in eval mode; see :func:`build`."""
    return build("mobilenet_v2", num_classes, weights, seed, batchnorm_images, image_size)


def build(architecture: str, num_classes: int, weights: str | None, seed: int,
          batchnorm_images: int, image_size: int) -> nn.Module:
    """``weights``: a local state_dict file (``.pth`` / ``.safetensors``), loaded as is; else
    torchvision's random init under ``torch.manual_seed(seed)``, then BatchNorm running
    statistics measured on ``batchnorm_images`` crops (random BatchNorm statistics would make
    folding trivial and the activations meaningless)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = getattr(torchvision_models(), architecture)(weights=None, num_classes=num_classes)
    if weights is not None:
        model.load_state_dict(_load_state_dict(Path(weights)))
    elif batchnorm_images > 0:
        measure_batchnorm_statistics(model, PhotoCrops(batchnorm_images, image_size, seed,
                                                       BATCHNORM_STREAM))
    return model.float().eval()


@torch.no_grad()
def measure_batchnorm_statistics(model: nn.Module, images: PhotoCrops) -> None:
    """Set every BatchNorm's running mean/variance to their average over ``images``."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches
    model.train()
    for batch in DataLoader(images, batch_size=BATCHNORM_BATCH):
        model(batch)
    for norm in norms:
        norm.momentum = 0.1  # torchvision's default
    model.eval()


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist: give a local state_dict "
                                "(.pth or .safetensors), or weights=None for random weights")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)
