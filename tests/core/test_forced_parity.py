"""Teacher-forced parity: each quantization point of the exported graph fed PyTorch's codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import numpy_helper

from adaround_core import quantization as q
from adaround_core.export.forced_parity import (
    MAX_OUTPUT_DIFF,
    PointParity,
    forced_graph,
    forced_parity,
)
from adaround_core.export.onnx_export import export_quantized
from adaround_core.quant.qconfig import QConfig
from adaround_core.quant.quant_layers import quant_layers


class SharedLinear(torch.nn.Module):
    """One Linear called twice: two quantization points of the same layer."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.inner(torch.relu(self.inner(x)))))


def _rounded(h, model, shape, bits=(4, 8)):
    batches = h.make_batches(4, shape)
    prepared = q.prepare_qat_fx(model, QConfig(weight_bits=bits[0], activation_bits=bits[1]))
    h.calibrate(prepared, batches)
    q.weight_reconstruction(prepared, batches, None, {"num_steps": 5, "progress": False})
    q.set_fake_quantize(prepared, q.FakeQuantState.VALIDATION)
    return prepared, export_quantized(prepared, batches[0][:2]).onnx_model


def _inputs(shape, n=4):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("bits", [(4, 8), (2, 4)])
def test_a_faithful_export_is_within_one_step_at_every_point(h, bits):
    model, proto = _rounded(h, h.cnn(), (4, 3, 6, 6), bits)
    result = forced_parity(model, proto, _inputs((64, 3, 6, 6)))
    assert [p.label for p in result.points] == list(quant_layers(model))
    assert result.samples == 256
    assert all(p.codes > 0 and p.max_step <= 1 for p in result.points)
    assert result.output_diff_of_range <= MAX_OUTPUT_DIFF
    assert result.violation() is None
    assert set(result.summary()) == {"forced_points", "forced_max_code_step",
                                     "forced_max_flip_share", "forced_output_diff_of_range"}


def test_a_layer_called_twice_is_two_points(h):
    torch.manual_seed(0)
    model, proto = _rounded(h, SharedLinear().eval(), (8, 6))
    graph, points = forced_graph(proto)
    assert [(p.layer, p.call) for p in points] == [("inner", 0), ("inner", 1), ("head", 0)]
    assert [p.label for p in points][1] == "inner (call 2)"
    assert {p.forced_input for p in points} <= {i.name for i in graph.graph.input}
    assert forced_parity(model, proto, _inputs((32, 6))).violation() is None


def _corrupt_weight(proto, layer: str) -> None:
    for init in proto.graph.initializer:
        if init.name == f"{layer}.weight":
            ints = numpy_helper.to_array(init).copy()
            ints.flat[: ints.size // 2] = -ints.flat[: ints.size // 2]
            init.CopyFrom(numpy_helper.from_array(ints, init.name))
            return
    raise AssertionError(f"no initializer {layer}.weight")


def test_a_wrong_weight_is_named_at_the_next_point(h):
    """conv1's weight corrupted: the codes at conv2's input (computed from conv1's output)
    move; conv1's own input is still right."""
    model, proto = _rounded(h, h.cnn(), (4, 3, 6, 6))
    _corrupt_weight(proto, "conv1")
    result = forced_parity(model, proto, _inputs((64, 3, 6, 6)))
    by_label = {p.label: p for p in result.points}
    assert by_label["conv1"].flips == 0
    assert by_label["conv2"].max_step > 1 or by_label["conv2"].too_many_flips
    assert "'conv2'" in result.violation()


def test_a_wrong_output_is_named_when_every_point_is_right(h):
    """The head's weight corrupted: no quantization point follows it, the outputs differ."""
    model, proto = _rounded(h, h.cnn(), (4, 3, 6, 6))
    _corrupt_weight(proto, "head")
    result = forced_parity(model, proto, _inputs((64, 3, 6, 6)))
    assert all(p.flips == 0 for p in result.points)
    assert result.violation().startswith("the outputs differ by")
    assert f"at evaluation sample {result.worst_output_sample} " in result.violation()
    assert 0 <= result.worst_output_sample < result.samples


def test_the_flip_bound_scales_with_the_tensor_and_has_a_floor():
    assert not PointParity("a", codes=10, flips=2, max_step=1).too_many_flips
    assert PointParity("a", codes=10, flips=3, max_step=1).too_many_flips
    assert not PointParity("a", codes=100_000, flips=100, max_step=1).too_many_flips
    assert PointParity("a", codes=100_000, flips=101, max_step=1).too_many_flips


def test_a_step_beyond_one_names_the_first_sample():
    from adaround_core.export.forced_parity import _compare_codes

    parity = PointParity("conv2")
    expected = np.zeros((4, 3), np.uint8)
    got = expected.copy()
    got[2, 1] = 2
    got[1, 0] = 1
    _compare_codes(parity, expected, got, first_sample=10)
    assert (parity.max_step, parity.first_sample, parity.flips) == (2, 12, 2)
    assert parity.first_flip_sample == 11
