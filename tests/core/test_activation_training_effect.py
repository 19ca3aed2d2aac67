"""QDrop and learned activation scales lower the model's output error against plain
AdaRound at W4A4 (a 5-layer MLP, 200 steps, fixed seeds; measured margins in the
docstrings of the tests)."""

from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn

from adaround_core.quantization import (
    FakeQuantState,
    QConfig,
    prepare_qat_fx,
    set_fake_quantize,
    weight_reconstruction,
)

STEPS = 200
SEEDS = (0, 1, 2)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(16, 32), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(32, 8)).eval()


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(100)
    calibration = [torch.randn(32, 16, generator=g) for _ in range(8)]
    return _mlp(), calibration, torch.randn(2000, 16, generator=g)


def _output_mse(setup, **config) -> float:
    float_model, calibration, held_out = setup
    model = prepare_qat_fx(float_model, QConfig(weight_bits=4, activation_bits=4))
    set_fake_quantize(model, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for batch in calibration:
            model(batch)
    weight_reconstruction(model, calibration, None,
                          {"num_steps": STEPS, "progress": False, **config})
    set_fake_quantize(model, FakeQuantState.VALIDATION)
    with torch.no_grad():
        return (model(held_out) - float_model(held_out)).pow(2).mean().item()


def _mean_over_seeds(setup, **config) -> float:
    return statistics.mean(_output_mse(setup, seed=s, **config) for s in SEEDS)


@pytest.fixture(scope="module")
def plain(setup) -> float:
    return _mean_over_seeds(setup)


def test_qdrop_lowers_the_output_error(setup, plain):
    """Measured: 9.4 % lower on average (per seed +12.4 %, +16.3 %, -0.6 %): QDrop's effect
    on a model this small is real but seed-dependent, so the test averages three seeds."""
    assert _mean_over_seeds(setup, drop_prob=0.5) < 0.97 * plain


def test_learned_activation_scales_lower_the_output_error(setup, plain):
    """Measured: 27-36 % lower for each seed (min-max scales are too wide at 4 bits)."""
    assert _mean_over_seeds(setup, activation_lr=1e-3) < 0.8 * plain
