"""LSQ: the learned-scale fake quant's gradients against autograd through a plain
straight-through fake quant, and the learned scales staying in the model."""

from __future__ import annotations

import pytest
import torch

from adaround_core.export.onnx_export import export_quantized
from adaround_core.quant.lsq import lsq_fake_quantize, lsq_grad_scale
from adaround_core.quant.quant_math import fake_quantize
from adaround_core.quantization import (
    FakeQuantState,
    QConfig,
    set_fake_quantize,
    weight_reconstruction,
)


def _ste_fake_quantize(x, scale, zero_point, qmin, qmax):
    """LSQ as the paper writes it: round with a straight-through gradient, the scale's
    gradient scaled by g through ``s * g + (s - s * g).detach()``."""
    g = 1.0 / (x.numel() * qmax) ** 0.5
    s = scale * g + (scale - scale * g).detach()
    scaled = x / s
    rounded = scaled + (torch.round(scaled) - scaled).detach()
    return (torch.clamp(rounded + zero_point, qmin, qmax) - zero_point) * s


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gradients_equal_autograd_through_a_straight_through_fake_quant(bits):
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(4, 3, 5, 5, generator=g) * 2).requires_grad_(True)
    qmax = 2**bits - 1
    zero_point = torch.tensor([float(qmax // 3)])
    scale = torch.tensor([4.0 / qmax], requires_grad=True)
    upstream = torch.randn(x.shape, generator=g)

    (lsq_fake_quantize(x, scale, zero_point, 0, qmax) * upstream).sum().backward()
    grad_x, grad_s = x.grad.clone(), scale.grad.clone()
    x.grad, scale.grad = None, None
    (_ste_fake_quantize(x, scale, zero_point, 0, qmax) * upstream).sum().backward()

    clipped = (x.grad == 0).float().mean()
    assert 0 < clipped < 1, "the test must cover both clipped and unclipped values"
    torch.testing.assert_close(grad_x, x.grad)
    torch.testing.assert_close(grad_s, scale.grad, rtol=1e-5, atol=1e-7)


def test_forward_is_the_plain_fake_quant_bit_for_bit():
    x = torch.randn(1000) * 3
    scale, zero_point = torch.tensor([0.05]), torch.tensor([7.0])
    assert torch.equal(lsq_fake_quantize(x, scale, zero_point, 0, 15),
                       fake_quantize(x, scale, zero_point, 0, 15))


def test_grad_scale_is_one_over_sqrt_numel_times_qmax():
    assert lsq_grad_scale(100, 15) == pytest.approx(1 / (1500 ** 0.5))


def test_learned_scales_stay_in_the_model_and_go_into_the_export(h, fast_cfg):
    _, q, batches = h.calibrated_cnn(qconfig=QConfig(activation_bits=4))
    before = {name: fq.scale.clone() for name, fq in _activation_quantizers(q).items()}
    weight_reconstruction(q, batches, None, {**fast_cfg, "activation_lr": 1e-2, "guard": False})
    after = _activation_quantizers(q)
    assert all(bool(fq.frozen) for fq in after.values())
    learned = {n: after[n].scale.item() for n in before if not torch.equal(before[n], after[n].scale)}
    assert learned, "no activation scale was learned"
    set_fake_quantize(q, FakeQuantState.VALIDATION)
    exported = export_quantized(q, batches[0][:2])
    scales = {node.input[1].removesuffix(".input_fake_quant.scale"): node.input[0]
              for node in exported.onnx_model.graph.node if node.op_type == "QuantizeLinear"}
    for name, scale in learned.items():
        (entry,) = exported.encodings["activation_encodings"][scales[name]]
        assert entry["scale"] == pytest.approx(scale)


def _activation_quantizers(model):
    return {name: m.input_fake_quant for name, m in model.named_modules()
            if hasattr(m, "input_fake_quant")}
