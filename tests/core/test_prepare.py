"""``prepare_qat_fx``: layer swap, qualified names, BatchNorm folding, attention."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaround_core.quant.fake_quantize import FakeQuantState, fake_quantizers, set_fake_quantize
from adaround_core.quant.prepare import is_prepared
from adaround_core.quant.qconfig import QConfig
from adaround_core.quant.quant_layers import QuantLayerMixin, QuantLinear, QuantMultiheadAttention
from adaround_core.quantization import prepare_qat_fx


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_qualified_names_are_preserved(h):
    float_model = h.cnn()
    q = prepare_qat_fx(float_model)
    modules = dict(q.named_modules())
    assert torch.equal(modules["head"].weight, float_model.head.weight)
    assert set(dict(float_model.named_modules())) <= set(modules)
    assert set(dict(float_model.named_parameters())) <= set(dict(q.named_parameters()))
    assert isinstance(modules["conv1"], nn.Conv2d) and isinstance(modules["conv1"], QuantLayerMixin)
    assert is_prepared(q) and not is_prepared(float_model)


def test_original_model_is_untouched(h):
    float_model = h.cnn()
    before = h.state_snapshot(float_model)
    types = {n: type(m) for n, m in float_model.named_modules()}
    x = torch.randn(2, 3, 6, 6)
    q = prepare_qat_fx(float_model, example_inputs=x)
    h.calibrate(q, [x])
    set_fake_quantize(q, FakeQuantState.VALIDATION)
    q(x)
    h.assert_same_state(before, float_model)
    assert {n: type(m) for n, m in float_model.named_modules()} == types
    assert not fake_quantizers(float_model)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in float_model.modules())
    assert q.conv1.weight.data_ptr() != float_model.conv1.weight.data_ptr()


def test_inplace_returns_the_same_model(h):
    model = h.TinyMLP()
    assert prepare_qat_fx(model, inplace=True) is model
    assert isinstance(model.fc1, QuantLinear)


def test_prepared_model_starts_in_float_state(h):
    q = prepare_qat_fx(h.TinyMLP())
    assert {fq.state for fq in fake_quantizers(q)} == {FakeQuantState.FLOAT}
    assert len(fake_quantizers(q)) == 6  # input and weight quantizer per layer


def test_preparing_twice_is_an_error(h):
    q = prepare_qat_fx(h.TinyMLP())
    with pytest.raises(ValueError, match="already prepared"):
        prepare_qat_fx(q)


def test_model_without_layers_is_an_error():
    with pytest.raises(ValueError, match="no Conv/Linear"):
        prepare_qat_fx(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))


@pytest.mark.parametrize("with_example", [True, False])
def test_batchnorm_after_conv_is_folded(h, with_example):
    float_model = h.cnn()
    x = torch.randn(2, 3, 6, 6)
    q = prepare_qat_fx(float_model, example_inputs=x if with_example else None)
    if with_example:
        assert isinstance(q.bn1, nn.Identity) and isinstance(q.bn2, nn.Identity)
    else:
        assert isinstance(q.bn1, nn.BatchNorm2d)  # folded at the first eval forward
    with torch.no_grad():
        _close(q(x), float_model(x))
    assert isinstance(q.bn1, nn.Identity) and isinstance(q.bn2, nn.Identity)
    with torch.no_grad():
        _close(q(x), float_model(x))  # and stays equal


def test_train_mode_forward_does_not_fold(h):
    q = prepare_qat_fx(h.cnn())
    q.train()
    q(torch.randn(4, 3, 6, 6))
    assert isinstance(q.bn1, nn.BatchNorm2d)
    q.eval()
    q(torch.randn(2, 3, 6, 6))
    assert isinstance(q.bn1, nn.Identity)


def test_no_folding_when_disabled(h):
    float_model = h.cnn()
    x = torch.randn(2, 3, 6, 6)
    q = prepare_qat_fx(float_model, QConfig(fold_batchnorm=False), example_inputs=x)
    with torch.no_grad():
        assert torch.equal(q(x), float_model(x))
    assert isinstance(q.bn1, nn.BatchNorm2d)


def test_deepcopy_before_first_forward_folds_too(h):
    float_model = h.cnn()
    q = prepare_qat_fx(float_model)
    clone = copy.deepcopy(q)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        _close(clone(x), float_model(x))
    assert isinstance(clone.bn1, nn.Identity) and isinstance(q.bn1, nn.BatchNorm2d)


def test_folding_happens_before_the_weight_observer_sees_the_weight(h):
    float_model = h.cnn()
    q = prepare_qat_fx(float_model)  # fold pending
    h.calibrate(q, [torch.randn(2, 3, 6, 6)])
    set_fake_quantize(q, FakeQuantState.VALIDATION)
    bn = float_model.bn1
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded = float_model.conv1.weight * factor.reshape(-1, 1, 1, 1)
    expected = folded.detach().abs().amax(dim=(1, 2, 3)) / 7.5
    _close(q.conv1.weight_fake_quant.scale, expected)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x, y):
        return self.bn(self.conv(x)).mean(dim=(2, 3)) + self.fc(y)


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_example_inputs_as_args_or_kwargs(h, kind):
    float_model = h.randomize_batchnorms(TwoInputs()).eval()
    x, y = torch.randn(2, 2, 3, 3), torch.randn(2, 4)
    example = (x, y) if kind == "tuple" else {"x": x, "y": y}
    q = prepare_qat_fx(float_model, example_inputs=example)
    assert isinstance(q.bn, nn.Identity)
    with torch.no_grad():
        _close(q(x, y=y), float_model(x, y))


class SharedOutput(nn.Module):
    """The conv output feeds the BatchNorm *and* a residual add: folding would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.conv2(self.bn(y) + y)


@pytest.mark.parametrize("with_example", [True, False])
def test_batchnorm_whose_input_is_used_elsewhere_is_not_folded(h, with_example):
    float_model = h.randomize_batchnorms(SharedOutput()).eval()
    x = torch.randn(2, 3, 4, 4)
    q = prepare_qat_fx(float_model, example_inputs=x if with_example else None)
    with torch.no_grad():
        out = q(x)
    assert isinstance(q.bn, nn.BatchNorm2d)
    assert torch.equal(q.conv.weight, float_model.conv.weight)
    with torch.no_grad():
        assert torch.equal(out, float_model(x))


class Zoo(nn.Module):
    """Every supported layer kind plus functional ops, residual adds and concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(4)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.dw_bn = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.up_bn = nn.BatchNorm2d(4)
        self.conv1d = nn.Conv1d(4, 4, 3, padding=1)
        self.bn1d = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 5)
        self.fc_bn = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = x + F.relu(self.grouped(x))  # residual
        y = F.relu(self.dw_bn(self.depthwise(x)))
        x = torch.cat([x, y], dim=1)  # concatenation
        x = F.avg_pool2d(x, 2)
        x = F.relu(self.up_bn(self.up(x)))
        s = x.flatten(2)  # (N, C, L)
        s = F.gelu(self.bn1d(self.conv1d(s))) * 0.5 + s
        v = self.fc_bn(self.fc(s.mean(-1)))
        return self.head(torch.tanh(v))


def test_zoo_of_layers_prepares_and_matches_float(h):
    float_model = h.randomize_batchnorms(Zoo()).eval()
    x = torch.randn(3, 3, 4, 4)
    q = prepare_qat_fx(float_model)
    with torch.no_grad():
        ref = float_model(x)
        _close(q(x), ref)
    names = ["stem", "grouped", "depthwise", "up", "conv1d", "fc", "head"]
    assert all(isinstance(q.get_submodule(n), QuantLayerMixin) for n in names)
    folded = ["stem_bn", "dw_bn", "up_bn", "bn1d", "fc_bn"]
    assert all(isinstance(q.get_submodule(n), nn.Identity) for n in folded)
    h.calibrate(q, [x, torch.randn(3, 3, 4, 4)])
    with torch.no_grad():
        _close(q(x), ref)  # CALIBRATION leaves outputs as float
        set_fake_quantize(q, FakeQuantState.VALIDATION)
        out = q(x)
    assert torch.isfinite(out).all() and not torch.allclose(out, ref, atol=1e-4)


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.fc(torch.relu(self.fc(x))))


def test_module_called_twice(h):
    float_model = CalledTwice().eval()
    x = torch.randn(5, 4)
    q = prepare_qat_fx(float_model, example_inputs=x)  # no pending first-forward fold pass
    calls = []
    q.fc.register_forward_hook(lambda m, a, o: calls.append(a[0].detach()))
    with torch.no_grad():
        assert torch.equal(q(x), float_model(x))
    assert len(calls) == 2
    h.calibrate(q, [x])
    observer = q.fc.input_fake_quant.observer
    seen = torch.cat([c.flatten() for c in calls[2:]])
    assert observer.min_val.item() == seen.min().item()  # both calls observed
    assert observer.max_val.item() == seen.max().item()


class Attention(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out, weights = self.attn(x, x, x)
        return self.head(out), weights


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("grad", [True, False])
def test_multihead_attention_out_proj_is_quantized_and_called(batch_first, grad):
    torch.manual_seed(0)
    float_model = Attention(batch_first).eval()
    x = torch.randn(2, 5, 8)
    q = prepare_qat_fx(float_model, example_inputs=x)  # no pending first-forward fold pass
    assert type(q.attn) is QuantMultiheadAttention
    assert isinstance(q.attn.out_proj, QuantLinear)
    assert "attn.out_proj" in dict(q.named_modules())
    calls = []
    q.attn.out_proj.register_forward_hook(lambda m, a, o: calls.append(o))
    with torch.set_grad_enabled(grad):
        ref_out, ref_w = float_model(x)
        out, weights = q(x)
        assert len(calls) == 1
        _close(out, ref_out)
        _close(weights, ref_w)
        set_fake_quantize(q, FakeQuantState.CALIBRATION)
        q(x)
        assert q.attn.out_proj.input_fake_quant.observer.has_data
        set_fake_quantize(q, FakeQuantState.VALIDATION)
        quant_out, _ = q(x)
    assert len(calls) == 3
    assert not torch.allclose(quant_out, ref_out, atol=1e-4)


def _encoder_layer() -> nn.Module:
    """Inside a container: a hook on the root (the pending BatchNorm fold) must not be
    what keeps the layer off its fused path."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    return nn.Sequential(layer, nn.Linear(8, 3)).eval()


def test_transformer_encoder_layer_fast_path_is_not_taken(h, monkeypatch):
    fused_calls = []
    fused = torch._transformer_encoder_layer_fwd

    def counting_fused(*args, **kwargs):
        fused_calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counting_fused)
    float_model = _encoder_layer()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        ref = float_model(x)
    assert fused_calls == [1]  # precondition: the stock layer takes the fused path here

    q = prepare_qat_fx(float_model)
    with torch.no_grad():
        _close(q(x), ref)
    h.calibrate(q, [torch.randn(2, 5, 8) for _ in range(2)])
    assert q[0].linear1.input_fake_quant.observer.has_data  # quantized layers were called
    assert q[0].self_attn.out_proj.input_fake_quant.observer.has_data
    set_fake_quantize(q, FakeQuantState.VALIDATION)
    with torch.no_grad():
        quant_out = q(x)
    assert fused_calls == [1]  # the prepared model never took the fused path
    assert not torch.allclose(quant_out, ref, atol=1e-4)
    _close(quant_out, q(x).detach())  # grad enabled: same result as eval + no_grad
