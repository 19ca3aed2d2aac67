"""torchvision's ResNet-18 and MobileNetV2: import beside the CPU torch, factories, data
source and the library chain (BatchNorm folding, residual adds, ReLU6, depthwise convs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from adaround_core import quantization as q
from examples.chain import quantize_and_compare
from examples.vision.data import photo_crops
from examples.vision.metrics import SNR_CAP_DB, output_agreement
from examples.vision.models import mobilenet_v2, resnet18
from examples.vision.torchvision_import import torchvision_models

SIZE = 32  # tiny images keep these tests fast; the architectures are the 224 px ones


def test_torchvision_models_import_beside_the_cpu_torch():
    models = torchvision_models()
    assert models.ResNet.__module__ == "torchvision.models.resnet"
    assert torchvision_models() is models


@pytest.mark.parametrize("factory", [resnet18, mobilenet_v2])
def test_factories_give_seeded_float_models_with_measured_batchnorm(factory):
    model = factory(num_classes=10, batchnorm_images=4, image_size=SIZE)
    again = factory(num_classes=10, batchnorm_images=4, image_size=SIZE)
    assert not model.training
    x = torch.stack([photo_crops(1, 1, SIZE)["evaluation"][0]])
    with torch.no_grad():
        assert model(x).shape == (1, 10)
        assert torch.equal(model(x), again(x))
    norm = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert not torch.equal(norm.running_var, torch.ones_like(norm.running_var))


def test_the_factory_loads_a_local_state_dict_and_names_a_missing_one(tmp_path):
    source = resnet18(num_classes=5, batchnorm_images=0, seed=3)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = resnet18(num_classes=5, weights=str(path), seed=0)
    assert torch.equal(loaded.fc.weight, source.fc.weight)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        resnet18(weights=str(tmp_path / "missing.pth"))


def test_the_data_source_streams_reproducible_normalised_crops():
    data = photo_crops(num_calibration=3, num_evaluation=5, image_size=SIZE, seed=0)
    assert set(data) == {"calibration", "evaluation"}
    image = data["calibration"][0]
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    assert torch.equal(image, data["calibration"][0])
    assert not torch.equal(image, data["evaluation"][0])
    assert -3.0 < image.min() and image.max() < 3.0
    assert next(iter(DataLoader(data["evaluation"], batch_size=5))).shape == (5, 3, SIZE, SIZE)
    assert "train" in photo_crops(1, 1, SIZE, num_train=2)
    with pytest.raises(IndexError):
        data["calibration"][3]


def test_a_crop_is_the_same_bits_whatever_the_thread_count():
    """The pipeline checks the calibration samples' digest in every stage, and the stages
    run with different thread counts (antialiased resizing sums in thread-dependent order)."""
    crops = photo_crops(num_calibration=4, num_evaluation=1, image_size=224)["calibration"]
    previous = torch.get_num_threads()
    try:
        by_threads = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            by_threads[threads] = torch.stack([crops[i] for i in range(4)])
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(by_threads[1], by_threads[2])


@pytest.mark.parametrize(("factory", "layers"), [
    (resnet18, ["conv1", "layer1.0.conv1", "layer1.0.conv2"]),
    (mobilenet_v2, ["features.0.0", "features.1.conv.0.0", "features.1.conv.1"]),
])
def test_the_library_chain_runs_on_the_architecture(factory, layers):
    model = factory(num_classes=10, batchnorm_images=4, image_size=SIZE)
    data = photo_crops(num_calibration=8, num_evaluation=8, image_size=SIZE)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    keep = set(layers)
    result = quantize_and_compare(model, data, output_agreement, q.QConfig(weight_bits=4),
                                  {"num_steps": 2, "progress": False,
                                   "exclude_prefix": [n for n in names if n not in keep]},
                                  batch_size=4)
    assert [r.name for r in result.report] == layers
    assert result.float_metrics == {"top1_agreement": 1.0, "output_snr_db": SNR_CAP_DB}
    for metrics in (result.nearest_metrics, result.adaround_metrics):
        assert 0.0 <= metrics["top1_agreement"] <= 1.0
        assert 0.0 < metrics["output_snr_db"] < SNR_CAP_DB
