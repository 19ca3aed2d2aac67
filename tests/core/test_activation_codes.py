"""Fake-quantized activations cached as integer codes: decoded, bit-identical to the fake
quantization; no codes where that could not hold; written and read back by the layer cache
and the one-pass capture."""

from __future__ import annotations

import pytest
import torch

from adaround_core.calibration import activation_codes
from adaround_core.calibration.activation_codes import ActivationCodes, integer_codes
from adaround_core.calibration.graph_trace import trace_layer_graph
from adaround_core.calibration.one_pass_capture import OnePassCapture
from adaround_core.calibration.sample_store import cached_groups, read_manifest, write_layer_cache
from adaround_core.quant.fake_quantize import FakeQuantize, FakeQuantState
from adaround_core.quant.model_modes import eval_mode, fake_quant_state, float_reference
from adaround_core.quant.observers import MinMaxObserver
from adaround_core.quant.quant_layers import quant_layers
from adaround_core.quant.quant_math import fake_quantize

GRIDS = [  # (scale, zero point, qmin, qmax)
    (0.0371, 17.0, 0, 255),  # an asymmetric activation quantizer, uint8 codes
    (0.0123, 0.0, -128, 127),  # a symmetric one, int8 codes
    (0.25, 3.0, 0, 15),  # 4 bits
]


def _edge_values(n: int) -> torch.Tensor:
    """Random values over and beyond the grid, halfway points, -0.0 and infinities."""
    torch.manual_seed(0)
    x = torch.randn(n) * 4
    x[:64] = torch.arange(64) * 0.5 * 0.0371  # halfway between grid points, for rounding
    x[64:68] = torch.tensor([-0.0, float("inf"), float("-inf"), 1e30])
    return x


@pytest.mark.parametrize("grid", GRIDS)
def test_decoded_codes_equal_the_fake_quantization_bit_for_bit(monkeypatch, grid):
    monkeypatch.setattr(activation_codes, "CHUNK", 1000)  # several chunks and a short tail
    scale, zero_point, qmin, qmax = grid
    s, z = torch.tensor([scale]), torch.tensor([zero_point])
    x = _edge_values(4567).reshape(1, 4567)
    encoded = integer_codes(x, s, z, qmin, qmax)
    assert encoded is not None
    assert encoded.codes.dtype == (torch.uint8 if qmin >= 0 else torch.int8)
    assert encoded.shape == x.shape
    expected = fake_quantize(x, s, z, qmin, qmax)
    decoded = encoded.decode()
    assert decoded.dtype == torch.float32
    assert torch.equal(decoded.view(torch.int32), expected.view(torch.int32))  # -0.0 too


def test_no_codes_where_the_decoding_could_differ():
    s, z = torch.tensor([0.1]), torch.tensor([0.0])
    x = torch.randn(10)
    assert integer_codes(x, s, z, 0, 65535) is None  # wider than 8 bits
    assert integer_codes(x.double(), s, z, 0, 255) is None
    assert integer_codes(x, torch.tensor([0.1, 0.2]), z, 0, 255) is None  # per channel
    x[3] = float("nan")
    assert integer_codes(x, s, z, 0, 255) is None


def test_a_quantizer_gives_codes_only_when_it_fake_quantizes_per_tensor_with_fixed_qparams():
    fq = FakeQuantize(MinMaxObserver(), 0, 255)
    x = torch.rand(2, 8)
    fq.set_state(FakeQuantState.CALIBRATION)
    fq(x)
    assert fq.codes(x) is None
    fq.set_state(FakeQuantState.VALIDATION)
    assert torch.equal(fq.codes(x).decode(), fq(x))
    fq.substitute = lambda t: t
    assert fq.codes(x) is None


def test_the_layer_cache_writes_codes_in_a_quarter_of_the_bytes_and_reads_them_decoded(
        tmp_path):
    s, z = torch.tensor([0.05]), torch.tensor([4.0])
    inputs = [torch.rand(4, 3, 5) * 3 for _ in range(3)]
    targets = [torch.randn(4, 2) for _ in range(3)]
    write_layer_cache(tmp_path, [(integer_codes(x, s, z, 0, 255), y)
                                 for x, y in zip(inputs, targets, strict=True)])
    shards = read_manifest(tmp_path)["inputs"]
    assert {(sh.dtype, sh.grid) for sh in shards} == {("torch.uint8", (0.05000000074505806, 4.0))}
    assert (tmp_path / shards[0].file).stat().st_size == 4 * 3 * 5  # one byte a value
    [(stored_inputs, _)] = cached_groups(tmp_path)
    assert stored_inputs.row_nbytes == 3 * 5 * 4  # a row as read: float32
    rows = stored_inputs.gather(torch.arange(12))
    assert torch.equal(rows, torch.cat([fake_quantize(x, s, z, 0, 255) for x in inputs]))


def test_a_batch_without_codes_is_its_own_group(tmp_path):
    s, z = torch.tensor([0.05]), torch.tensor([0.0])
    x = torch.rand(4, 3)
    write_layer_cache(tmp_path, [(integer_codes(x, s, z, 0, 255), x), (x, x)])
    groups = cached_groups(tmp_path)
    assert [g[0].num_rows for g in groups] == [4, 4]
    assert torch.equal(groups[0][0].gather(torch.arange(4)), fake_quantize(x, s, z, 0, 255))
    assert torch.equal(groups[1][0].gather(torch.arange(4)), x)


def test_one_pass_capture_with_codes_gives_the_same_inputs(tmp_path):
    """Through a cache written from codes, every layer's inputs equal the float capture's
    (the same model, the same batches, each layer rounded to nearest in between)."""
    from test_one_pass_capture import LEAVES, ResidualCNN, _capture_state

    q, batches, order = _capture_state(ResidualCNN(), (2, 3, 8, 8))
    float_model = float_reference(q)
    with eval_mode(q), fake_quant_state(q, FakeQuantState.VALIDATION):
        graph = trace_layer_graph(q, order, LEAVES, batches[0])
        plain = OnePassCapture(q, float_model, graph, order, batches)
        encoded = OnePassCapture(q, float_model, graph, order, batches)
        for name in order:
            quant_layers(q)[name].freeze_weight_qparams()
            want = list(plain.iter_layer_io(name))
            got = list(encoded.iter_layer_io(name, codes=True))
            assert all(isinstance(x, ActivationCodes) for x, _ in got)
            (tmp_path / name).mkdir()
            write_layer_cache(tmp_path / name, got)
            [(inputs, targets)] = cached_groups(tmp_path / name)
            every_row = torch.arange(inputs.num_rows)
            assert torch.equal(inputs.gather(every_row), torch.cat([x for x, _ in want]))
            assert torch.equal(targets.gather(every_row), torch.cat([y for _, y in want]))
        plain.close()
        encoded.close()


def test_the_per_layer_capture_with_codes_gives_the_same_inputs():
    from test_one_pass_capture import ResidualCNN, _capture_state

    from adaround_core.calibration.layer_capture import iter_layer_io

    q, batches, order = _capture_state(ResidualCNN(), (2, 3, 8, 8))
    float_model = float_reference(q)
    with eval_mode(q), fake_quant_state(q, FakeQuantState.VALIDATION):
        for name in order:
            want = list(iter_layer_io(q, float_model, name, 1, batches))
            got = list(iter_layer_io(q, float_model, name, 1, batches, codes=True))
            assert all(isinstance(x, ActivationCodes) for x, _ in got)
            assert all(torch.equal(x.decode(), w) and torch.equal(y, v)
                       for (x, y), (w, v) in zip(got, want, strict=True))
