"""``guard: output``: each unit (a layer, a block, a layer with learned activation scales)
keeps its learned state only where the model's output on held-out calibration batches is no
further from float than with its nearest state."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from block_models import TinyResNet
from torch import nn
from torch.utils.data import DataLoader

from adaround_core.quant.model_modes import float_reference
from adaround_core.quant.quant_layers import quant_layers
from adaround_core.quantization import (
    FakeQuantState,
    QConfig,
    prepare_qat_fx,
    set_fake_quantize,
    weight_reconstruction,
)
from adaround_core.reconstruction.output_guard import (
    ADAROUND,
    NEAREST_BY_OUTPUT,
    held_out_indices,
    output_error,
    split_held_out,
)
from adaround_core.reconstruction.reconstruction_config import AdaRoundConfig


class ConvSharedNet(nn.Module):
    """Conv1d -> a Linear called twice (over the length axis) -> Linear head."""

    def __init__(self, channels: int = 4, length: int = 16, out: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=1)
        self.shared = nn.Linear(length, length)
        self.head = nn.Linear(channels * length, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = self.shared(torch.relu(self.shared(x)))
        return self.head(x.flatten(1))


SEED = 5  # the case: with the layer guard every layer improves, the output does not


def _case(seed: int = SEED):
    """The float net, its W3A8 calibrated copy, 4 calibration batches of 8, 512 test inputs."""
    torch.manual_seed(seed)
    float_model = ConvSharedNet().eval()
    g = torch.Generator().manual_seed(seed + 1000)
    batches = [torch.randn(8, 4, 16, generator=g) for _ in range(4)]
    test = torch.randn(512, 4, 16, generator=g)
    model = prepare_qat_fx(float_model, QConfig(weight_bits=3, activation_bits=8))
    set_fake_quantize(model, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for b in batches:
            model(b)
    return float_model, model, batches, test


@torch.no_grad()
def _error(model, float_model, x) -> float:
    set_fake_quantize(model, FakeQuantState.VALIDATION)
    return (model(x) - float_model(x)).pow(2).mean().item()


def _rounded(guard, steps: int = 200, seed: int = SEED):
    float_model, model, batches, test = _case(seed)
    nearest = copy.deepcopy(model)
    report = weight_reconstruction(model, batches, None,
                                   {"num_steps": steps, "progress": False, "guard": guard})
    return report, model, nearest, float_model, batches, test


@pytest.fixture(scope="module")
def layer_guard():
    return _rounded("layer")


@pytest.fixture(scope="module")
def output_guard():
    return _rounded("output")


def test_the_layer_guard_keeps_roundings_that_raise_the_output_error(layer_guard):
    report, model, nearest, float_model, _, test = layer_guard
    assert all(r.decision == ADAROUND and r.adaround_mse < r.nearest_mse for r in report), \
        report.format_table()
    assert _error(model, float_model, test) > _error(nearest, float_model, test)


def test_the_output_guard_keeps_the_output_at_most_as_far_as_nearest(output_guard):
    report, model, nearest, float_model, _, test = output_guard
    assert NEAREST_BY_OUTPUT in {r.decision for r in report}, report.format_table()
    assert _error(model, float_model, test) <= _error(nearest, float_model, test)


def test_each_decision_keeps_the_smaller_held_out_output_error(output_guard):
    report, model, nearest, float_model, batches, _ = output_guard
    for r in report:
        kept_nearest = r.adaround_output_mse > r.nearest_output_mse
        assert r.decision == (NEAREST_BY_OUTPUT if kept_nearest else ADAROUND), r.name
    # a layer starts from what the layers before it kept: the errors never grow
    for before, after in zip(report.layers, report.layers[1:], strict=False):
        kept = min(before.nearest_output_mse, before.adaround_output_mse)
        assert after.nearest_output_mse == pytest.approx(kept, rel=1e-5), after.name
    held = torch.cat([batches[i] for i in held_out_indices(len(batches), 1, 0)])
    assert _error(model, float_model, held) <= _error(nearest, float_model, held) * (1 + 1e-5)


def test_the_held_out_batches_are_left_out_of_the_layer_samples(output_guard, layer_guard):
    # the layers see 3 of the 4 batches (24 rows); with guard=layer all 4 (32 rows)
    (with_output, *_), (with_layer, *_) = output_guard, layer_guard
    assert with_output[0].nearest_mse != with_layer[0].nearest_mse


@pytest.mark.parametrize("guard", ["off", False])
def test_guard_off_keeps_adaround_everywhere(h, guard):
    _, q, batches = h.calibrated_cnn()
    bad = {"num_steps": 5, "lr": 100.0, "warm_up": 1.0, "progress": False, "guard": guard}
    report = weight_reconstruction(q, batches, None, bad)
    assert {r.decision for r in report} == {ADAROUND}
    assert any(r.adaround_mse > r.nearest_mse for r in report)
    assert all(r.nearest_output_mse is None and r.adaround_output_mse is None for r in report)


def test_true_is_the_layer_guard(h):
    weights = []
    for guard in (True, "layer"):
        _, q, batches = h.calibrated_cnn()
        weight_reconstruction(q, batches, None, {"num_steps": 5, "lr": 100.0, "guard": guard,
                                                 "progress": False})
        weights.append({k: v.clone() for k, v in q.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert AdaRoundConfig.from_dict({"guard": True}).guard == "layer"
    assert AdaRoundConfig.from_dict({"guard": False}).guard == "off"


@pytest.mark.parametrize(("custom", "key"), [({"guard": "model"}, "guard"),
                                             ({"guard": 1}, "guard"),
                                             ({"guard_batches": 0}, "guard_batches")])
def test_bad_guard_values_are_one_line_errors_naming_the_key(h, custom, key):
    _, q, batches = h.calibrated_cnn()
    before = copy.deepcopy(q.state_dict())
    with pytest.raises(ValueError, match=rf"custom_config_dict\['{key}'\]") as err:
        weight_reconstruction(q, batches, None, custom)
    assert "\n" not in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_held_out_batches_are_seeded_and_leave_one_for_optimisation():
    assert held_out_indices(8, 2, 0) == held_out_indices(8, 2, 0)
    assert held_out_indices(8, 2, 0) != held_out_indices(8, 2, 1)
    assert held_out_indices(3, 5, 0) == sorted(held_out_indices(3, 5, 0))
    assert len(held_out_indices(3, 5, 0)) == 2 and held_out_indices(1, 1, 0) == []


def test_a_streamed_dataloader_is_split_as_a_list_is():
    data = torch.arange(12.0).reshape(6, 2)
    listed = split_held_out(list(data.split(2)), 1, 3)
    streamed = split_held_out(DataLoader(data, batch_size=2), 1, 3)
    assert [t.tolist() for t in listed[0]] == [t.tolist() for t in streamed[0]]
    assert [t.tolist() for t in listed[1]] == [t.tolist() for t in streamed[1]]
    assert len(listed[0]) == 2 and len(listed[1]) == 1


def test_a_single_batch_is_judged_with_a_warning(caplog):
    batch = torch.ones(2, 3)
    with caplog.at_level(logging.WARNING):
        training, held = split_held_out([batch], 1, 0)
    assert training == [batch] and held == [batch]
    assert "none can be held out" in caplog.text


def test_the_output_error_covers_every_float_tensor_of_nested_outputs():
    out = {"a": torch.ones(2), "b": (torch.zeros(3), torch.tensor([1, 2]))}
    ref = {"a": torch.zeros(2), "b": (torch.ones(3), torch.tensor([5, 5]))}
    assert output_error(out, ref) == (5.0, 5)  # the integer tensor is not compared


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.body(x))
        return {"a": self.a(h), "b": (self.b(h), h.sum(1))}


def test_models_with_dict_outputs_are_guarded(h):
    torch.manual_seed(0)
    q = prepare_qat_fx(TwoHeads().eval(), QConfig(weight_bits=3))
    batches = h.make_batches(4, (8, 6))
    h.calibrate(q, batches)
    report = weight_reconstruction(q, batches, None, {"num_steps": 20, "guard": "output",
                                                      "progress": False})
    assert [r.name for r in report] == ["body", "a", "b"]
    assert all(r.nearest_output_mse is not None and r.decision in (ADAROUND, NEAREST_BY_OUTPUT)
               for r in report)


class IntegerOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).argmax(1)


def test_an_output_without_float_tensors_is_an_error_naming_the_fix(h):
    q = prepare_qat_fx(IntegerOutput().eval())
    batches = h.make_batches(3, (4, 6))
    h.calibrate(q, batches)
    before = q.fc.weight.detach().clone()
    with pytest.raises(ValueError, match="no floating-point tensor.*use guard: layer"):
        weight_reconstruction(q, batches, None, {"guard": "output", "progress": False})
    assert torch.equal(q.fc.weight, before)


# ``guard: output`` on every unit kind: a block's layers, and a unit with learned activation
# scales, are judged as a whole (learned state against nearest state) on the model's output.
# Each case rounds a single unit (the others excluded) with ``guard: output`` and recomputes its
# two candidate states directly: nearest is the calibrated model as it was; learned is the
# same unit rounded with ``guard: off`` on the batches the guard did not hold out (the same
# samples, so the same learned state). Both are judged by hand on the held-out batch.

W3A4 = QConfig(weight_bits=3, activation_bits=4)
UNIT_BATCHES, UNIT_SEED = 4, 0
# The unit rounded (every other layer excluded) and its config; lr 2.0 over 3 steps makes a
# rounding worse than nearest.
STAGE_1 = ("stage.1", ["stem", "stage.0", "head"])
CASES = {
    "block": (*STAGE_1, {"granularity": "block"}),
    "block, bad rounding": (*STAGE_1, {"granularity": "block", "lr": 2.0, "num_steps": 3}),
    "learned scales": ("stage.0.conv2", ["stem", "stage.0.conv1", "stage.1", "head"],
                       {"activation_lr": 1e-2}),
    "block, learned scales, QDrop": ("stage.0", ["stem", "stage.1", "head"],
                                     {"granularity": "block", "activation_lr": 1e-2,
                                      "drop_prob": 0.5}),
}


def _calibrated_resnet(h):
    torch.manual_seed(0)
    batches = h.make_batches(UNIT_BATCHES, (4, 3, 8, 8))
    q = prepare_qat_fx(TinyResNet().eval(), W3A4)
    h.calibrate(q, batches)
    return q, batches


def _config(case: str, guard: str) -> dict:
    _, excluded, extra = CASES[case]
    return {"num_steps": 30, "progress": False, "seed": UNIT_SEED, "exclude_prefix": excluded,
            "guard": guard, **extra}


@torch.no_grad()
def _output_mse(model, reference, batches) -> float:
    set_fake_quantize(model, FakeQuantState.VALIDATION)
    total = sum((model(b) - reference(b)).pow(2).sum().item() for b in batches)
    return total / sum(reference(b).numel() for b in batches)


@torch.no_grad()
def _state(model) -> dict[str, torch.Tensor]:
    """Each layer's weight as the model computes with it (on its grid), and every
    quantizer's qparams."""
    set_fake_quantize(model, FakeQuantState.VALIDATION)
    weights = {f"{name}.weight": layer.weight_fake_quant(layer.weight)
               for name, layer in quant_layers(model).items()}
    qparams = {k: v.clone() for k, v in model.state_dict().items()
               if k.endswith((".scale", ".zero_point"))}
    return weights | qparams


@pytest.mark.parametrize("case", list(CASES))
def test_the_output_guard_keeps_the_unit_state_with_the_smaller_model_output_error(h, case):
    q, batches = _calibrated_resnet(h)
    nearest, learned = copy.deepcopy(q), copy.deepcopy(q)
    reference = float_reference(q)
    held = held_out_indices(UNIT_BATCHES, 1, UNIT_SEED)
    held_out = [b for i, b in enumerate(batches) if i in held]
    training = [b for i, b in enumerate(batches) if i not in held]

    [row] = weight_reconstruction(q, batches, None, _config(case, "output"))
    weight_reconstruction(learned, training, None, _config(case, "off"))
    nearest_err = _output_mse(nearest, reference, held_out)
    learned_err = _output_mse(learned, reference, held_out)

    assert row.name == CASES[case][0]
    assert row.nearest_output_mse == pytest.approx(nearest_err, rel=1e-5)
    assert row.adaround_output_mse == pytest.approx(learned_err, rel=1e-5)
    kept = learned if learned_err <= nearest_err else nearest
    assert row.decision == (ADAROUND if kept is learned else NEAREST_BY_OUTPUT)
    expected = _state(kept)
    assert [k for k, v in _state(q).items() if not torch.equal(v, expected[k])] == []


def test_the_cases_see_both_decisions(h):
    """The cases above exercise keeping the learned state and keeping nearest."""
    decisions = set()
    for case in ("block", "block, bad rounding"):
        q, batches = _calibrated_resnet(h)
        [row] = weight_reconstruction(q, batches, None, _config(case, "output"))
        decisions.add(row.decision)
    assert decisions == {ADAROUND, NEAREST_BY_OUTPUT}
