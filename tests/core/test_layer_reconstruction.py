"""AdaRound on one layer: the learned rounding, the held-out judgement, the guard."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adaround_core.calibration.layer_samples import LayerSamples
from adaround_core.quant.qconfig import QConfig
from adaround_core.quantization import prepare_qat_fx
from adaround_core.reconstruction.layer_reconstruction import (
    holdout_mse,
    nearest_weight,
    optimise_rounding,
    reconstruct_layer,
)
from adaround_core.reconstruction.reconstruction_config import AdaRoundConfig


def _setup(weight_bits: int = 3, n: int = 256, seed: int = 0):
    """A frozen-scale QuantLinear, its float twin, and samples (inputs, float outputs)."""
    torch.manual_seed(seed)
    float_layer = nn.Linear(16, 8)
    model = prepare_qat_fx(nn.Sequential(float_layer),
                           QConfig(weight_bits=weight_bits, activation_bits=None))
    layer = model[0]
    layer.freeze_weight_qparams()
    # correlated features: with white inputs nearest rounding is already optimal
    mixing = torch.randn(16, 16) + 2.0 * torch.eye(16)
    x = torch.randn(n, 16) @ mixing
    with torch.no_grad():
        y = float_layer(x)
    samples = LayerSamples.from_tensors(list(x.split(32)), list(y.split(32)), 0.25,
                                        torch.Generator().manual_seed(0))
    return float_layer, layer, samples


def _cfg(**kwargs) -> AdaRoundConfig:
    return AdaRoundConfig.from_dict({"progress": False, **kwargs})


def _grid(layer):
    scale = layer.weight_fake_quant.scale.reshape(-1, 1)
    return scale, layer.weight_fake_quant.qmin, layer.weight_fake_quant.qmax


def test_nearest_weight_matches_torch():
    _, layer, _ = _setup()
    fq = layer.weight_fake_quant
    expected = torch.fake_quantize_per_channel_affine(
        layer.weight, fq.scale, torch.zeros(8, dtype=torch.int32), 0, fq.qmin, fq.qmax)
    assert torch.equal(nearest_weight(layer), expected)


def test_holdout_mse_by_hand():
    float_layer, layer, samples = _setup()
    weight = torch.zeros_like(layer.weight)
    total, count = 0.0, 0
    for _, y in samples.holdout(1000):
        total += (float_layer.bias - y).pow(2).sum().item()
        count += y.numel()
    assert count == 64 * 8  # a quarter of 256 rows, 8 outputs each
    assert holdout_mse(layer, weight, samples) == pytest.approx(total / count, rel=1e-6)
    assert holdout_mse(layer, float_layer.weight.detach(), samples) < 1e-10


def test_optimised_rounding_is_floor_or_ceil_on_the_grid():
    _, layer, samples = _setup()
    steps = []
    cfg = _cfg(num_steps=30)
    rounded = optimise_rounding(layer, samples, cfg, torch.Generator().manual_seed(0),
                                on_step=steps.append)
    assert steps == list(range(30))
    scale, qmin, qmax = _grid(layer)
    ints = rounded / scale
    assert torch.equal(ints, torch.round(ints))
    w_scaled = layer.weight.detach() / scale
    floor = torch.floor(w_scaled).clamp(qmin, qmax)
    ceil = (torch.floor(w_scaled) + 1).clamp(qmin, qmax)
    assert torch.all((torch.round(ints) == floor) | (torch.round(ints) == ceil))


def test_without_learning_rounding_is_nearest():
    _, layer, samples = _setup()
    cfg = _cfg(num_steps=1, lr=1e-12, weight=0.0)
    rounded = optimise_rounding(layer, samples, cfg, torch.Generator().manual_seed(0))
    # h(V) = rest, so [V >= 0] = [rest >= .5]; exact ties (the channel minimum sits at
    # -amax / s = qmin + .5) may go either way
    scaled = layer.weight.detach() / _grid(layer)[0]
    tie = (scaled - torch.floor(scaled) - 0.5).abs() < 1e-4
    assert tie.sum() <= 8
    assert torch.equal(rounded[~tie], nearest_weight(layer)[~tie])


def _rounding(**cfg) -> torch.Tensor:
    _, layer, samples = _setup()
    return optimise_rounding(layer, samples, _cfg(**cfg), torch.Generator().manual_seed(0))


def test_regulariser_drives_the_rounding_and_warm_up_switches_it_off():
    free = _rounding(num_steps=100, weight=0.0)
    all_warm_up = _rounding(num_steps=100, weight=1e3, warm_up=1.0)
    # a dominant, gently-shaped (small beta) regulariser pushes every h(V) to its nearer
    # end from the start, which is nearest rounding
    regularised = _rounding(num_steps=100, weight=1e3, warm_up=0.0, b_range=(3.0, 2.0))
    assert torch.equal(free, all_warm_up)  # no regularised step at all
    assert not torch.equal(free, regularised)
    _, layer, _ = _setup()
    nearest = nearest_weight(layer)
    assert (regularised != nearest).sum() < (free != nearest).sum()


def test_reconstruct_layer_beats_nearest_and_writes_the_weight():
    float_layer, layer, samples = _setup()
    bias = layer.bias.detach().clone()
    report = reconstruct_layer("fc", layer, samples, _cfg(num_steps=200),
                               torch.Generator().manual_seed(0))
    assert report.name == "fc" and report.num_steps == 200 and report.seconds >= 0
    assert report.decision == "adaround" and not report.kept_nearest
    assert report.adaround_mse < report.nearest_mse
    assert report.adaround_mse == pytest.approx(holdout_mse(layer, layer.weight, samples), rel=1e-6)
    assert torch.equal(layer.bias, bias)  # bias untouched
    scale, _, _ = _grid(layer)
    assert torch.equal(layer.weight / scale, torch.round(layer.weight / scale))


def test_guard_keeps_nearest_when_adaround_is_worse():
    _, layer, samples = _setup()
    nearest = nearest_weight(layer)
    report = reconstruct_layer("fc", layer, samples, _cfg(num_steps=5, lr=100.0, warm_up=1.0),
                               torch.Generator().manual_seed(0))
    assert report.adaround_mse > report.nearest_mse
    assert report.decision == "nearest(layer)" and report.kept_nearest
    assert torch.equal(layer.weight, nearest)


def test_without_guard_the_worse_rounding_is_kept():
    _, layer, samples = _setup()
    nearest = nearest_weight(layer)
    report = reconstruct_layer("fc", layer, samples,
                               _cfg(num_steps=5, lr=100.0, warm_up=1.0, guard=False),
                               torch.Generator().manual_seed(0))
    assert report.adaround_mse > report.nearest_mse
    assert report.decision == "adaround"
    assert not torch.equal(layer.weight, nearest)


def test_same_generator_seed_same_result():
    results = []
    for _ in range(2):
        _, layer, samples = _setup()
        reconstruct_layer("fc", layer, samples, _cfg(num_steps=20),
                          torch.Generator().manual_seed(7))
        results.append(layer.weight.detach().clone())
    assert torch.equal(results[0], results[1])
