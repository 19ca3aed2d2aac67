"""Observers: what they record and the qparams they derive from it."""

from __future__ import annotations

import pytest
import torch

from adaround_core.quant import observers as obs

QMIN, QMAX = 0, 255


def _covered_range(scale: torch.Tensor, zp: torch.Tensor) -> tuple[float, float]:
    return ((QMIN - zp) * scale).item(), ((QMAX - zp) * scale).item()


def _data_with_outlier(n: int = 20000) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, generator=g)
    x[123] = 20.0
    return x


def test_minmax_observer_tracks_running_extremes():
    o = obs.MinMaxObserver()
    assert not o.has_data
    o.observe(torch.tensor([[0.5, 2.0], [-1.0, 0.0]]))
    o.observe(torch.tensor([3.0, -0.25]))
    assert o.has_data
    assert o.min_val.item() == -1.0 and o.max_val.item() == 3.0


def test_minmax_qparams_cover_the_range_and_include_zero():
    o = obs.MinMaxObserver()
    x = torch.randn(1000) * 2 + 0.7
    o.observe(x)
    scale, zp = o.qparams(QMIN, QMAX)
    lo, hi = _covered_range(scale, zp)
    half_step = scale.item() / 2
    assert lo <= x.min().item() + half_step and hi >= x.max().item() - half_step
    assert zp.item() == round(zp.item()) and QMIN <= zp.item() <= QMAX
    zero = torch.fake_quantize_per_tensor_affine(torch.zeros(1), scale.item(), int(zp), QMIN, QMAX)
    assert zero.item() == 0.0  # zero is exactly representable


def test_minmax_qparams_of_positive_data_start_at_zero():
    o = obs.MinMaxObserver()
    o.observe(torch.rand(100) + 1.0)  # all in [1, 2)
    scale, zp = o.qparams(QMIN, QMAX)
    assert zp.item() == 0.0
    assert scale.item() == pytest.approx(o.max_val.item() / 255, rel=1e-6)


@pytest.mark.parametrize(
    "observer", [obs.PercentileObserver(99.9), obs.MSEObserver()], ids=["percentile", "mse"]
)
def test_clipping_observers_clip_an_outlier(observer):
    # 4-bit activations: clipping one outlier at 20 (of 20000 N(0, 1) values) lowers the MSE
    qmin, qmax = 0, 15
    x = _data_with_outlier()
    minmax = obs.MinMaxObserver()
    for chunk in x.split(5000):
        minmax.observe(chunk)
        observer.observe(chunk)
    mm_scale, _ = minmax.qparams(qmin, qmax)
    scale, zp = observer.qparams(qmin, qmax)
    assert scale.item() < 0.5 * mm_scale.item()
    lo, hi = ((qmin - zp) * scale).item(), ((qmax - zp) * scale).item()
    assert lo < -1.0 and hi > 1.0  # the bulk of the data still fits
    assert hi < 20.0  # the outlier does not


def test_percentile_observer_clips_to_the_percentile():
    x = torch.arange(0.0, 10001.0)  # 0..10000, no negative values
    o = obs.PercentileObserver(99.0)
    o.observe(x)
    scale, zp = o.qparams(QMIN, QMAX)
    assert zp.item() == 0.0  # lower bound is widened to 0
    assert (QMAX * scale).item() == pytest.approx(9900.0, rel=1e-3)


def test_sampling_observers_are_deterministic(monkeypatch):
    monkeypatch.setattr(obs, "PER_BATCH_SAMPLES", 500)  # force sub-sampling
    x = _data_with_outlier(8000) * torch.rand(8000)
    results = []
    for _ in range(2):
        o = obs.MSEObserver()
        for chunk in x.split(4000):
            o.observe(chunk)
        results.append(o.qparams(QMIN, QMAX))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_reservoir_is_bounded(monkeypatch):
    monkeypatch.setattr(obs, "RESERVOIR_SIZE", 1000)
    monkeypatch.setattr(obs, "PER_BATCH_SAMPLES", 300)
    o = obs.PercentileObserver()
    for _ in range(10):
        o.observe(torch.randn(5000))
    assert o._reservoir.numel() == 1000


def test_sampling_observer_restored_from_state_dict_uses_min_max():
    o = obs.MSEObserver()
    o.observe(torch.linspace(-1.0, 3.0, 100))
    restored = obs.MSEObserver()
    restored.load_state_dict(o.state_dict())
    assert restored.has_data
    scale, zp = restored.qparams(QMIN, QMAX)
    lo, hi = _covered_range(scale, zp)
    assert lo <= 0.0 <= hi and 0 < hi <= 3.0 + scale.item()


@pytest.mark.parametrize("axis", [0, 1])
def test_weight_minmax_observer_hand_scale(axis):
    w = torch.tensor([[1.5, -0.75, 0.0], [-3.0, 0.3, 0.6]])
    o = obs.WeightMinMaxObserver(axis=axis)
    assert not o.has_data
    o.observe(w)
    scale, zp = o.qparams(-8, 7)
    amax = {0: [1.5, 3.0], 1: [3.0, 0.75, 0.6]}[axis]
    torch.testing.assert_close(scale, torch.tensor(amax) / 7.5)
    assert torch.equal(zp, torch.zeros_like(scale))


def test_weight_observer_keeps_latest_weight():
    o = obs.WeightMinMaxObserver()
    o.observe(torch.full((2, 2), 4.0))
    o.observe(torch.ones(2, 2))
    scale, _ = o.qparams(-8, 7)
    torch.testing.assert_close(scale, torch.full((2,), 1 / 7.5))


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_weight_mse_scale_error_not_above_minmax(bits):
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    w = torch.randn(8, 4, 3, 3)
    w[0, 0, 0, 0] = 9.0  # outlier in channel 0
    errors = []
    for cls in (obs.WeightMinMaxObserver, obs.WeightMSEObserver):
        o = cls(axis=0)
        o.observe(w)
        scale, zp = o.qparams(qmin, qmax)
        fq = torch.fake_quantize_per_channel_affine(w, scale, zp.to(torch.int32), 0, qmin, qmax)
        errors.append((fq - w).pow(2).sum(dim=(1, 2, 3)))
    minmax_err, mse_err = errors
    assert torch.all(mse_err <= minmax_err)
    assert mse_err.sum() < minmax_err.sum()


def test_observer_registries():
    assert set(obs.ACTIVATION_OBSERVERS) == {"minmax", "mse", "percentile"}
    assert set(obs.WEIGHT_OBSERVERS) == {"minmax", "mse"}
