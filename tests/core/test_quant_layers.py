"""Quantized layers: every supported Conv/Linear type, checked against torch's kernels."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adaround_core.quant import quant_layers as ql
from adaround_core.quant.fake_quantize import FakeQuantState, set_fake_quantize
from adaround_core.quant.qconfig import QConfig
from adaround_core.quantization import prepare_qat_fx


class Wrap(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x, *args):
        return self.layer(x, *args)


# (float layer, input shape, quant type, weight axis)
LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (4, 6), ql.QuantLinear, 0),
    "linear_3d_input": (lambda: nn.Linear(6, 5), (2, 3, 6), ql.QuantLinear, 0),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 7), ql.QuantConv1d, 0),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 5, 5), ql.QuantConv2d, 0),
    "conv2d_grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2), (2, 4, 5, 5), ql.QuantConv2d, 0),
    "conv2d_depthwise": (lambda: nn.Conv2d(4, 4, 3, groups=4, bias=False), (2, 4, 5, 5),
                         ql.QuantConv2d, 0),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), (1, 2, 3, 3, 3), ql.QuantConv3d, 0),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2), (2, 3, 5),
                         ql.QuantConvTranspose1d, 1),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1), (2, 3, 4, 4),
                         ql.QuantConvTranspose2d, 1),
    "conv_transpose2d_grouped": (lambda: nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2),
                                 (2, 4, 3, 3), ql.QuantConvTranspose2d, 1),
    "conv_transpose3d": (lambda: nn.ConvTranspose3d(2, 3, 2), (1, 2, 2, 2, 2),
                         ql.QuantConvTranspose3d, 1),
}


def _prepared(name: str, qconfig: QConfig | None = None):
    make, shape, quant_type, axis = LAYERS[name]
    torch.manual_seed(0)
    float_model = Wrap(make()).eval()
    q = prepare_qat_fx(float_model, qconfig)
    batches = [torch.randn(*shape) for _ in range(3)]
    return float_model, q, batches, quant_type, axis


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_is_swapped_in_place(name):
    float_model, q, _, quant_type, axis = _prepared(name)
    layer = q.layer
    assert type(layer) is quant_type
    assert isinstance(layer, type(float_model.layer))  # isinstance checks keep working
    assert layer.weight_axis == axis
    assert torch.equal(layer.weight, float_model.layer.weight)
    assert layer.weight_fake_quant.scale.numel() == layer.weight.shape[axis]
    assert ql.quant_layers(q) == {"layer": layer}


@pytest.mark.parametrize("name", list(LAYERS))
def test_float_calibration_and_validation_match_torch(name):
    float_model, q, batches, _, axis = _prepared(name)
    x = batches[0]
    with torch.no_grad():
        ref = float_model(x)
        assert torch.equal(q(x), ref)  # FLOAT
        set_fake_quantize(q, FakeQuantState.CALIBRATION)
        outs = [q(b) for b in batches]
        assert torch.equal(outs[0], ref)  # CALIBRATION passes values through
        set_fake_quantize(q, FakeQuantState.VALIDATION)
        got = q(x)

    lo = min(b.min().item() for b in batches)
    hi = max(b.max().item() for b in batches)
    fq_in = q.layer.input_fake_quant
    assert fq_in.scale.item() == pytest.approx((hi - lo) / 255, rel=1e-6)
    x_q = torch.fake_quantize_per_tensor_affine(x, fq_in.scale.item(),
                                                int(fq_in.zero_point.item()), 0, 255)
    w = float_model.layer.weight.detach()
    dims = [d for d in range(w.dim()) if d != axis]
    fq_w = q.layer.weight_fake_quant
    torch.testing.assert_close(fq_w.scale, w.abs().amax(dim=dims) / 7.5)
    zp = torch.zeros(w.shape[axis], dtype=torch.int32)
    w_q = torch.fake_quantize_per_channel_affine(w, fq_w.scale, zp, axis, -8, 7)
    reference_layer = copy.deepcopy(float_model.layer)
    with torch.no_grad():
        reference_layer.weight.copy_(w_q)
        expected = reference_layer(x_q)
    assert torch.equal(got, expected)
    assert not torch.allclose(got, ref, atol=1e-5)


def test_conv_transpose_output_size_argument_is_forwarded():
    torch.manual_seed(0)
    float_model = Wrap(nn.ConvTranspose2d(2, 3, 3, stride=2)).eval()
    q = prepare_qat_fx(float_model)
    x = torch.randn(1, 2, 4, 4)
    with torch.no_grad():
        out = q(x, [10, 10])
        assert out.shape[-2:] == (10, 10)
        assert torch.equal(out, float_model(x, [10, 10]))


def test_forward_with_weight_uses_the_given_weight():
    _, q, batches, _, _ = _prepared("conv2d")
    x = batches[0]
    zero = torch.zeros_like(q.layer.weight)
    out = q.layer.forward_with_weight(x, zero)
    assert torch.equal(out, q.layer.bias.reshape(1, -1, 1, 1).expand_as(out))


def test_weight_qparams_broadcast_shape():
    _, q, batches, _, _ = _prepared("conv_transpose2d")
    scale, qmin, qmax = q.layer.weight_qparams()
    assert scale.shape == (1, 4, 1, 1) and (qmin, qmax) == (-8, 7)


def test_freeze_weight_qparams_uses_the_current_weight_once():
    _, q, _, _, _ = _prepared("linear")
    layer = q.layer
    layer.freeze_weight_qparams()
    expected = layer.weight.detach().abs().amax(dim=1) / 7.5
    torch.testing.assert_close(layer.weight_fake_quant.scale, expected)
    assert bool(layer.weight_fake_quant.frozen)
    with torch.no_grad():
        layer.weight.mul_(3.0)
    layer.freeze_weight_qparams()  # already frozen: unchanged
    torch.testing.assert_close(layer.weight_fake_quant.scale, expected)


def test_float_activations_give_identity_input_quant():
    _, q, _, _, _ = _prepared("linear", QConfig(activation_bits=None))
    assert isinstance(q.layer.input_fake_quant, nn.Identity)


@pytest.mark.parametrize(
    ("kind", "cls"), [("minmax", "MinMaxObserver"), ("mse", "MSEObserver"),
                      ("percentile", "PercentileObserver")]
)
def test_activation_observer_choice(kind, cls):
    _, q, _, _, _ = _prepared("linear", QConfig(activation_observer=kind, percentile=99.0))
    observer = q.layer.input_fake_quant.observer
    assert type(observer).__name__ == cls
    if kind == "percentile":
        assert observer.percentile == 99.0


def test_weight_bits_set_the_integer_range():
    _, q, _, _, _ = _prepared("linear", QConfig(weight_bits=3, activation_bits=6))
    assert (q.layer.weight_fake_quant.qmin, q.layer.weight_fake_quant.qmax) == (-4, 3)
    assert (q.layer.input_fake_quant.qmin, q.layer.input_fake_quant.qmax) == (0, 63)


def test_quant_layers_lists_a_shared_module_once():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    q = prepare_qat_fx(model)
    assert list(ql.quant_layers(q)) == ["0"]


def test_multihead_attention_identity_projection_is_restored_on_error():
    model = Wrap(nn.MultiheadAttention(4, 2))
    q = prepare_qat_fx(model)
    out_proj = q.layer.out_proj
    with pytest.raises((RuntimeError, AssertionError)):
        q.layer(torch.randn(3, 1, 5), torch.randn(3, 1, 5), torch.randn(3, 1, 5))  # bad dim
    assert q.layer.out_proj is out_proj
