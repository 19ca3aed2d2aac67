"""One-pass capture of block units (``granularity: block``): bit-identical to capturing each
unit with its own passes, one forward call per unit and batch, and the per-unit fallback."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from block_models import TinyMobileNet, TinyResNet, bert_batches, tiny_bert
from torch import nn

from adaround_core.calibration.capture_method import ONE_PASS, PER_LAYER
from adaround_core.quant.quant_layers import quant_layers
from adaround_core.quantization import QConfig, prepare_qat_fx, weight_reconstruction
from adaround_core.reconstruction import weight_reconstruction as wr

W4A4 = QConfig(weight_bits=4, activation_bits=4)
CFG = {"granularity": "block", "num_steps": 8, "progress": False, "guard": False}


class DataDependentBlocks(nn.Module):
    """Two blocks and a branch on the data between them: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        self.second = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        return self.second(x) if x.sum() > 0 else self.second(-x)


class SharedBlock(nn.Module):
    """One block called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(torch.relu(self.block(x)))


def _image_case(model: type[nn.Module], shape: tuple[int, ...]):
    def make(h):
        batches = h.make_batches(3, shape)
        return h.calibrate(prepare_qat_fx(model().eval(), W4A4), batches), batches
    return make


def _bert_case(h):
    batches = bert_batches(3)
    q = prepare_qat_fx(tiny_bert(), QConfig(weight_bits=4, activation_bits=8))
    return h.calibrate(q, batches), batches


CASES = {
    "residual_cnn": _image_case(TinyResNet, (4, 3, 8, 8)),
    "inverted_residual": _image_case(TinyMobileNet, (4, 3, 8, 8)),
    "bert_with_mask": _bert_case,
}


def _both_methods(monkeypatch, q, batches, cfg):
    """(model, report) rounded with one-pass capture, then with per-unit passes."""
    runs = []
    for one_pass in (True, False):
        model = copy.deepcopy(q)
        monkeypatch.setattr(wr, "ONE_PASS_CAPTURE", one_pass)
        runs.append((model, weight_reconstruction(model, batches, None, cfg)))
    return runs


def _assert_same_rounding(new, old):
    (q, new_report), (ref, old_report) = new, old
    for name, layer in quant_layers(q).items():
        assert torch.equal(layer.weight, quant_layers(ref)[name].weight), name
    key = [(r.name, r.layers, r.nearest_mse, r.adaround_mse, r.decision) for r in new_report]
    assert key == [(r.name, r.layers, r.nearest_mse, r.adaround_mse, r.decision)
                   for r in old_report]


@pytest.mark.parametrize("case", list(CASES))
def test_one_pass_block_units_round_bit_identically_to_per_unit_passes(h, monkeypatch, case):
    q, batches = CASES[case](h)
    new, old = _both_methods(monkeypatch, q, batches, CFG)
    _assert_same_rounding(new, old)
    assert any(r.layers != (r.name,) for r in new[1]), "no block unit was rounded"
    assert (new[1].capture_method, new[1].capture_note) == (ONE_PASS, "")
    assert old[1].capture_method == PER_LAYER


@pytest.mark.parametrize("extra", [{"drop_prob": 0.5}, {"activation_lr": 1e-3}])
def test_trained_activations_see_the_same_unit_inputs(h, monkeypatch, extra):
    q, batches = CASES["residual_cnn"](h)
    new, old = _both_methods(monkeypatch, q, batches, {**CFG, **extra})
    _assert_same_rounding(new, old)
    assert new[1].capture_method == ONE_PASS


def test_bert_layers_with_an_excluded_layer_inside_a_block(h, monkeypatch):
    q, batches = _bert_case(h)
    cfg = {**CFG, "exclude_prefix": ["layers.0.attention.query"]}
    new, old = _both_methods(monkeypatch, q, batches, cfg)
    _assert_same_rounding(new, old)
    assert new[1].capture_method == ONE_PASS


def _stem_calls(monkeypatch, q, batches, one_pass: bool) -> tuple[int, int]:
    """How often block reconstruction calls the stem (the first unit), and the units."""
    model = copy.deepcopy(q)
    calls = []
    model.stem.register_forward_pre_hook(lambda module, args: calls.append(1))
    monkeypatch.setattr(wr, "ONE_PASS_CAPTURE", one_pass)
    report = weight_reconstruction(model, batches, None, CFG)
    return len(calls), len(report)


def test_each_earlier_unit_runs_once_per_batch_after_it_is_rounded(h, monkeypatch):
    """The stem's hook counts its calls in both models (the float one is a deep copy).
    Per-unit passes run it in both for every unit and batch; one pass once per batch, plus
    four passes on the first batch (call order, block calls, the trace's check: graph, eager)."""
    q, batches = CASES["residual_cnn"](h)
    one_pass, units = _stem_calls(monkeypatch, q, batches, True)
    per_unit, _ = _stem_calls(monkeypatch, q, batches, False)
    assert one_pass <= 2 * len(batches) + 4
    assert per_unit >= 2 * units * len(batches)


@pytest.mark.parametrize(("model", "blocks", "reason"), [
    (DataDependentBlocks, ["first", "second"], "torch.fx cannot trace the model"),
    (SharedBlock, ["block"], "'block' is called 2 times"),
])
def test_where_one_pass_does_not_apply_units_fall_back_to_per_unit_passes_and_say_why(
        h, monkeypatch, caplog, model, blocks, reason):
    batches = h.make_batches(3, (6, 4))
    q = h.calibrate(prepare_qat_fx(model().eval(), W4A4), batches)
    with caplog.at_level(logging.WARNING):
        new, old = _both_methods(monkeypatch, q, batches, {**CFG, "blocks": blocks})
    _assert_same_rounding(new, old)
    assert new[1].capture_method == PER_LAYER and reason in new[1].capture_note
    assert any("one-pass capture does not apply" in r.message and "each unit" in r.message
               for r in caplog.records)
