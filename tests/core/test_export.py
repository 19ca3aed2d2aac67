"""Export to ONNX QDQ, AIMET-style encodings and integer weights, checked in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from adaround_core import quantization as q
from adaround_core.export.onnx_export import export_quantized, run_onnx_inputs
from adaround_core.quant.qconfig import QConfig
from adaround_core.quant.quant_layers import quant_layers

ENTRY_KEYS = {"bitwidth", "dtype", "is_symmetric", "scale", "offset", "min", "max"}


def _rounded(h, model, batches, qconfig: QConfig):
    prepared = q.prepare_qat_fx(model, qconfig)
    h.calibrate(prepared, batches)
    q.weight_reconstruction(prepared, batches, None, {"num_steps": 20, "progress": False})
    q.set_fake_quantize(prepared, q.FakeQuantState.VALIDATION)
    return prepared


def _models(h, name: str, qconfig: QConfig):
    if name == "cnn":
        batches = h.make_batches(4, (4, 3, 6, 6))
        return _rounded(h, h.cnn(), batches, qconfig), torch.randn(256, 3, 6, 6)
    return _rounded(h, h.mlp(), h.make_batches(4, (8, 6)), qconfig), torch.randn(512, 6)


def _ort(exported, x, optimized: bool = True):
    options = ort.SessionOptions()
    if not optimized:  # ONNX's reference semantics: no fusion into integer kernels
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(exported.onnx_model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, run_onnx_inputs(x, exported.onnx_model))[0]


@pytest.mark.parametrize("name", ["cnn", "mlp"])
@pytest.mark.parametrize("bits", [(4, 8), (2, 4), (8, 8)])
def test_the_onnx_graph_computes_what_the_fake_quant_model_computes(h, name, bits):
    """ONNX Runtime's reference kernels (no fusion) on the exported graph."""
    model, x = _models(h, name, QConfig(weight_bits=bits[0], activation_bits=bits[1]))
    with torch.no_grad():
        expected = model(x).numpy()
    got = _ort(export_quantized(model, x[:2]), x, optimized=False)
    assert (got.argmax(1) == expected.argmax(1)).all()
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_optimized_onnx_runtime_at_w4a8_stays_within_one_activation_step(h, name):
    """ORT's default session fuses QDQ into integer kernels: a pre-activation computed in
    integers can cross a rounding boundary of the next quantizer (one activation step)."""
    model, x = _models(h, name, QConfig(weight_bits=4, activation_bits=8))
    with torch.no_grad():
        expected = model(x).numpy()
    got = _ort(export_quantized(model, x[:2]), x)
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.99
    assert np.abs(got - expected).max() <= 0.01 * np.abs(expected).max()


def test_int8_weights_are_exactly_the_learned_rounding(h):
    model, x = _models(h, "cnn", QConfig(weight_bits=3, activation_bits=8))
    exported = export_quantized(model, x[:2])
    initializers = {i.name: numpy_helper.to_array(i) for i in exported.onnx_model.graph.initializer}
    for name, layer in quant_layers(model).items():
        ints = initializers[f"{name}.weight"]
        assert ints.dtype == np.int8 and ints.min() >= -4 and ints.max() <= 3
        scale = layer.weight_fake_quant.scale.reshape(-1, *([1] * (ints.ndim - 1)))
        assert torch.equal(torch.from_numpy(ints.astype(np.float32)) * scale,
                           layer.weight.detach())  # W = s * round(W / s), bit for bit
        assert torch.equal(exported.integer_tensors[f"{name}.weight.int"],
                           torch.from_numpy(ints.copy()))


def test_encodings_follow_the_aimet_layout(h):
    model, x = _models(h, "cnn", QConfig(weight_bits=4, activation_bits=8))
    exported = export_quantized(model, x[:2])
    enc = exported.encodings
    assert enc["version"] == "0.6.1" and set(enc) >= {"activation_encodings", "param_encodings"}
    graph = exported.onnx_model.graph
    quantized = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    assert set(enc["activation_encodings"]) == quantized
    assert set(enc["param_encodings"]) == {f"{n}.weight" for n in quant_layers(model)}
    for name, layer in quant_layers(model).items():
        entries = enc["param_encodings"][f"{name}.weight"]
        assert len(entries) == layer.weight.shape[0]
        for entry, s in zip(entries, layer.weight_fake_quant.scale.tolist(), strict=True):
            assert set(entry) == ENTRY_KEYS and entry["is_symmetric"] == "True"
            assert entry["offset"] == -8 and entry["scale"] == pytest.approx(s)
            assert entry["min"] == pytest.approx(-8 * s) and entry["max"] == pytest.approx(7 * s)
    for (entry,) in enc["activation_encodings"].values():
        assert entry["is_symmetric"] == "False" and entry["bitwidth"] == 8
        assert -255 <= entry["offset"] <= 0 and entry["min"] <= 0 <= entry["max"]


def test_export_leaves_the_model_as_it_was(h):
    model, x = _models(h, "mlp", QConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    states = [m.state for m in model.modules() if hasattr(m, "state")]
    export_quantized(model, x[:2])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.state for m in model.modules() if hasattr(m, "state")] == states
    onnx.checker.check_model(export_quantized(model, x[:2]).onnx_model)


def test_bad_input_is_a_clear_error(h):
    prepared = q.prepare_qat_fx(h.mlp(), QConfig())
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="layer 'fc1' was never calibrated"):
        export_quantized(prepared, x)
    h.calibrate(prepared, h.make_batches(2, (8, 6)))
    with pytest.raises(ValueError, match="set_fake_quantize.*VALIDATION"):
        export_quantized(prepared, x)
    q.set_fake_quantize(prepared, q.FakeQuantState.VALIDATION)
    with pytest.raises(ValueError, match="no layer was rounded: run weight_reconstruction"):
        export_quantized(prepared, x)
    nearest = export_quantized(prepared, x, allow_nearest=True)  # the baseline, on request
    assert {i.name for i in nearest.onnx_model.graph.initializer} >= {"fc1.weight"}
    model, _ = _models(h, "mlp", QConfig())
    with pytest.raises(ValueError, match="opset 12 is too low"):
        export_quantized(model, x, opset=12)
    wide, _ = _models(h, "mlp", QConfig(activation_bits=12))
    with pytest.raises(ValueError, match="more than 8 bits"):
        export_quantized(wide, x)
    with pytest.raises(ValueError, match="never prepared"):
        export_quantized(h.mlp(), x)


class _Spectral(torch.nn.Module):
    """An operation the ONNX exporter has no symbolic for (aten::fft_rfft)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(x).abs()


class _SpectralNet(torch.nn.Module):
    def __init__(self, inside: bool) -> None:
        super().__init__()
        self.inside = inside
        self.fc1 = torch.nn.Linear(6, 8)
        self.block = torch.nn.Sequential(torch.nn.ReLU(), _Spectral() if inside else
                                         torch.nn.Identity())
        self.head = torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(self.fc1(x))
        return self.head(y if self.inside else torch.fft.rfft(y).abs())


@pytest.mark.parametrize(("inside", "named"), [
    (True, r"module 'block\.1' \(_Spectral\)"),
    (False, r"the forward of the model itself \(_SpectralNet\)"),
])
def test_an_operation_onnx_cannot_express_names_its_module(h, inside, named):
    from adaround_core.export.export_failure import UnsupportedExportError

    model = _rounded(h, _SpectralNet(inside), h.make_batches(2, (8, 6)), QConfig())
    with pytest.raises(UnsupportedExportError, match=named + r".*aten::fft_rfft.*opset 17"):
        export_quantized(model, torch.randn(2, 6))


class _TokenModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc = torch.nn.Embedding(20, 8), torch.nn.Linear(8, 4)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).float()
        return self.fc((self.embed(input_ids) * mask).sum(1))


def test_a_dict_input_becomes_graph_inputs_named_by_key(h):
    """Keys in another order than ``forward``'s parameters still reach the right input."""
    torch.manual_seed(0)
    batch = {"attention_mask": torch.randint(0, 2, (4, 6)), "input_ids": torch.randint(0, 20, (4, 6))}
    model = _rounded(h, _TokenModel(), [batch, batch], QConfig(weight_bits=4))
    exported = export_quantized(model, batch)
    assert [i.name for i in exported.onnx_model.graph.input] == ["input_ids", "attention_mask"]
    with torch.no_grad():
        expected = model(**batch).numpy()
    assert np.abs(_ort(exported, batch, optimized=False) - expected).max() <= 1e-5
