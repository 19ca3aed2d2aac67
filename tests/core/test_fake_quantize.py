"""``FakeQuantize`` and the model-wide ``FakeQuantState`` switch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaround_core.quant.fake_quantize import (
    FakeQuantize,
    FakeQuantState,
    fake_quantizers,
    get_fake_quantize_states,
    restore_fake_quantize_states,
    set_fake_quantize,
)
from adaround_core.quant.observers import MinMaxObserver, WeightMinMaxObserver
from adaround_core.quantization import prepare_qat_fx


def _act_fq() -> FakeQuantize:
    return FakeQuantize(MinMaxObserver(), 0, 255)


def test_new_fake_quantize_is_float_passthrough():
    fq = _act_fq()
    assert fq.state is FakeQuantState.FLOAT
    x = torch.randn(10)
    assert torch.equal(fq(x), x)
    assert not fq.has_qparams and not fq.observer.has_data


def test_calibration_passes_through_and_observes():
    fq = _act_fq()
    fq.set_state(FakeQuantState.CALIBRATION)
    a, b = torch.randn(5, 3), torch.randn(7) * 4
    assert torch.equal(fq(a), a) and torch.equal(fq(b), b)
    assert fq.observer.min_val.item() == min(a.min().item(), b.min().item())
    assert fq.observer.max_val.item() == max(a.max().item(), b.max().item())
    assert fq.has_qparams and not bool(fq.calibrated)  # qparams not computed yet


def test_validation_computes_qparams_and_matches_torch():
    fq = _act_fq()
    fq.set_state(FakeQuantState.CALIBRATION)
    fq(torch.randn(200) * 2 + 0.5)
    fq.set_state(FakeQuantState.VALIDATION)
    assert bool(fq.calibrated)
    lo, hi = fq.observer.min_val.item(), fq.observer.max_val.item()
    assert fq.scale.item() == pytest.approx((hi - lo) / 255, rel=1e-6)
    assert fq.zero_point.item() == round(-lo / ((hi - lo) / 255))
    x = torch.randn(4, 50) * 3
    expected = torch.fake_quantize_per_tensor_affine(
        x, fq.scale.item(), int(fq.zero_point.item()), 0, 255)
    assert torch.equal(fq(x), expected)
    assert not torch.equal(fq(x), x)


def test_validation_does_not_observe():
    fq = _act_fq()
    fq.set_state("calibration")  # the string value works too
    fq(torch.tensor([-1.0, 1.0]))
    fq.set_state("validation")
    fq(torch.tensor([-100.0, 100.0]))
    assert (fq.observer.min_val.item(), fq.observer.max_val.item()) == (-1.0, 1.0)


@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_weight_fake_quant_matches_torch(axis):
    w = torch.randn(6, 5, 3)
    fq = FakeQuantize(WeightMinMaxObserver(axis=axis), -8, 7, w.shape[axis], axis=axis)
    fq.set_state(FakeQuantState.CALIBRATION)
    assert torch.equal(fq(w), w)
    fq.set_state(FakeQuantState.VALIDATION)
    dims = [d for d in range(3) if d != axis]
    torch.testing.assert_close(fq.scale, w.abs().amax(dim=dims) / 7.5)
    zp = torch.zeros(w.shape[axis], dtype=torch.int32)
    expected = torch.fake_quantize_per_channel_affine(w, fq.scale, zp, axis, -8, 7)
    assert torch.equal(fq(w), expected)


def test_frozen_qparams_never_change():
    fq = _act_fq()
    fq.set_state(FakeQuantState.CALIBRATION)
    fq(torch.tensor([-1.0, 1.0]))
    fq.set_state(FakeQuantState.VALIDATION)
    fq.freeze()
    scale, zp = fq.scale.clone(), fq.zero_point.clone()
    fq.set_state(FakeQuantState.CALIBRATION)
    fq(torch.tensor([-50.0, 50.0]))  # not observed while frozen
    fq.set_state(FakeQuantState.VALIDATION)
    assert torch.equal(fq.scale, scale) and torch.equal(fq.zero_point, zp)
    assert fq.observer.max_val.item() == 1.0


def test_update_without_data_is_a_noop():
    fq = _act_fq()
    fq.set_state(FakeQuantState.VALIDATION)
    assert torch.equal(fq.scale, torch.ones(1)) and not bool(fq.calibrated)


def test_invalid_state_rejected():
    with pytest.raises(ValueError):
        _act_fq().set_state("quantize")


def test_buffers_are_in_state_dict():
    keys = set(_act_fq().state_dict())
    assert {"scale", "zero_point", "calibrated", "frozen"} <= keys


# --- the model-wide switch ------------------------------------------------------------


def test_set_fake_quantize_needs_a_prepared_model():
    with pytest.raises(ValueError, match="prepare_qat_fx"):
        set_fake_quantize(nn.Linear(2, 2), FakeQuantState.CALIBRATION)


def test_states_on_a_prepared_model(h):
    float_model = h.TinyMLP().eval()
    q = prepare_qat_fx(float_model)
    x = torch.randn(16, 6)
    with torch.no_grad():
        ref = float_model(x)
        assert all(fq.state is FakeQuantState.FLOAT for fq in fake_quantizers(q))
        assert torch.equal(q(x), ref)  # FLOAT equals float

        assert set_fake_quantize(q, FakeQuantState.CALIBRATION) is q
        assert torch.equal(q(x), ref)  # CALIBRATION leaves outputs unchanged
        obs = q.fc1.input_fake_quant.observer
        assert (obs.min_val.item(), obs.max_val.item()) == (x.min().item(), x.max().item())
        hidden = torch.relu(float_model.fc1(x))
        assert q.fc2.input_fake_quant.observer.max_val.item() == hidden.max().item()
        assert q.fc1.weight_fake_quant.observer.has_data

        set_fake_quantize(q, FakeQuantState.VALIDATION)
        assert all(fq.state is FakeQuantState.VALIDATION for fq in fake_quantizers(q))
        out = q(x)
        assert not torch.allclose(out, ref, atol=1e-4)  # VALIDATION quantizes
        # the first layer by hand: per-tensor input, per-channel weight
        s_a, z_a = q.fc1.input_fake_quant.scale, q.fc1.input_fake_quant.zero_point
        x_q = torch.fake_quantize_per_tensor_affine(x, s_a.item(), int(z_a.item()), 0, 255)
        w = float_model.fc1.weight
        s_w = w.abs().amax(dim=1) / 7.5
        torch.testing.assert_close(q.fc1.weight_fake_quant.scale, s_w)
        w_q = torch.fake_quantize_per_channel_affine(
            w, q.fc1.weight_fake_quant.scale, torch.zeros(8, dtype=torch.int32), 0, -8, 7)
        seen = []
        handle = q.fc1.register_forward_hook(lambda m, a, o: seen.append(o))
        q(x)
        handle.remove()
        assert torch.equal(seen[0], F.linear(x_q, w_q, float_model.fc1.bias))

        set_fake_quantize(q, FakeQuantState.FLOAT)
        assert torch.equal(q(x), ref)  # back to float


def test_get_and_restore_states_do_not_recompute_qparams(h):
    _, q, batches = h.calibrated_mlp()
    saved = get_fake_quantize_states(q)
    assert set(saved.values()) == {FakeQuantState.CALIBRATION}
    assert "fc1.input_fake_quant" in saved and "head.weight_fake_quant" in saved
    set_fake_quantize(q, FakeQuantState.FLOAT)
    restore_fake_quantize_states(q, saved)
    assert get_fake_quantize_states(q) == saved
    assert not bool(q.fc1.input_fake_quant.calibrated)  # restoring computed nothing
