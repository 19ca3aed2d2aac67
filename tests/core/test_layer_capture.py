"""Forward-pass plumbing: first-call order and capturing one layer's inputs/outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adaround_core.calibration.layer_capture import capture_layer_io, first_call_order
from adaround_core.quant.fake_quantize import FakeQuantState, fake_quantizers, set_fake_quantize
from adaround_core.quant.quant_layers import quant_layers
from adaround_core.quantization import QConfig, prepare_qat_fx


class OutOfOrder(nn.Module):
    """Registered as late, early, unused, shared; called as early, shared, late, shared."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Linear(4, 2)
        self.early = nn.Linear(3, 4)
        self.unused = nn.Linear(4, 4)
        self.shared = nn.Linear(4, 4)

    def forward(self, x):
        x = self.shared(torch.relu(self.early(x)))
        return self.late(self.shared(x))


def _prepared(calibrate_with=None):
    torch.manual_seed(0)
    float_model = OutOfOrder().eval()
    q = prepare_qat_fx(float_model, example_inputs=torch.randn(1, 3))
    if calibrate_with is not None:
        set_fake_quantize(q, FakeQuantState.CALIBRATION)
        with torch.no_grad():
            for b in calibrate_with:
                q(b)
    return float_model, q


def test_first_call_order_and_call_counts():
    _, q = _prepared()
    before = [len(m._forward_pre_hooks) for m in q.modules()]
    order, calls = first_call_order(q, quant_layers(q), torch.randn(2, 3))
    assert list(quant_layers(q)) == ["late", "early", "unused", "shared"]
    assert order == ["early", "shared", "late"]  # the unused layer is left out
    assert dict(calls) == {"early": 1, "shared": 2, "late": 1}
    assert [len(m._forward_pre_hooks) for m in q.modules()] == before  # hooks removed


def test_first_call_order_removes_hooks_on_error():
    _, q = _prepared()
    before = [len(m._forward_pre_hooks) for m in q.modules()]
    with pytest.raises(RuntimeError):
        first_call_order(q, quant_layers(q), torch.randn(2, 5))  # wrong width
    assert [len(m._forward_pre_hooks) for m in q.modules()] == before


def _float_reference(q):
    ref = copy.deepcopy(q)
    for fq in fake_quantizers(ref):
        fq.state = FakeQuantState.FLOAT
    return ref


def test_capture_returns_quantized_inputs_and_float_outputs():
    batches = [torch.randn(3, 3) for _ in range(2)]
    float_model, q = _prepared(batches)
    set_fake_quantize(q, FakeQuantState.VALIDATION)
    inputs, targets = capture_layer_io(q, _float_reference(q), "early", 1, batches)
    assert len(inputs) == len(targets) == 2
    fq = q.early.input_fake_quant
    for b, x, y in zip(batches, inputs, targets, strict=True):
        expected_x = torch.fake_quantize_per_tensor_affine(
            b, fq.scale.item(), int(fq.zero_point.item()), 0, 255)
        assert torch.equal(x, expected_x)
        assert torch.equal(y, float_model.early(b).detach())


def test_capture_of_a_layer_called_twice_collects_both_calls():
    batches = [torch.randn(3, 3) for _ in range(2)]
    float_model, q = _prepared(batches)
    set_fake_quantize(q, FakeQuantState.VALIDATION)
    inputs, targets = capture_layer_io(q, _float_reference(q), "shared", 2, batches)
    assert len(inputs) == len(targets) == 4
    with torch.no_grad():
        b = batches[0]
        first = float_model.shared(torch.relu(float_model.early(b)))
        second = float_model.shared(first)
    torch.testing.assert_close(targets[0], first)
    torch.testing.assert_close(targets[1], second)


class SharedThenInPlace(nn.Module):
    """A shared layer whose first output an in-place op changes before its second call."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)

    def forward(self, x):
        y = self.shared(x)
        return self.shared(y.relu_())


def test_targets_of_a_layer_called_twice_are_not_changed_by_later_in_place_ops():
    """The pass runs on after the first call: what it took stays as the layer gave it."""
    torch.manual_seed(0)
    batches = [torch.randn(5, 4) for _ in range(2)]
    float_model = SharedThenInPlace().eval()
    q = prepare_qat_fx(copy.deepcopy(float_model), QConfig(activation_bits=None),
                       example_inputs=batches[0])
    set_fake_quantize(q, FakeQuantState.VALIDATION)
    inputs, targets = capture_layer_io(q, _float_reference(q), "shared", 2, batches)
    with torch.no_grad():
        first = float_model.shared(batches[0])
        assert (first < 0).any()  # the relu_ would have changed it
        torch.testing.assert_close(targets[0], first)
        torch.testing.assert_close(inputs[1], q.shared(batches[0]).relu())


def test_capture_stops_the_forward_pass_at_the_layer():
    batches = [torch.randn(3, 3)]
    _, q = _prepared(batches)
    set_fake_quantize(q, FakeQuantState.VALIDATION)
    ref = _float_reference(q)
    fired = []
    q.late.register_forward_pre_hook(lambda m, a: fired.append("quant"))
    ref.late.register_forward_pre_hook(lambda m, a: fired.append("float"))
    capture_layer_io(q, ref, "early", 1, batches)
    assert fired == []  # nothing past the captured layer ran


def test_capture_rejects_extra_layer_arguments():
    class ExtraArgs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(2, 2, 3, stride=2)

        def forward(self, x):
            return self.up(x, output_size=[8, 8])

    q = prepare_qat_fx(ExtraArgs())
    b = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="exclude_prefix"):
        capture_layer_io(q, _float_reference(q), "up", 1, [b])
