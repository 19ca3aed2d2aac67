"""One-pass capture: bit-identical to the per-layer passes, one forward call per layer and
batch, frontiers spilled to disk and persisted, and the fallback where it cannot apply."""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from adaround_core.calibration import frontier_store
from adaround_core.calibration.capture_method import ONE_PASS, PER_LAYER, layer_capturer
from adaround_core.calibration.frontier_store import load_frontiers, release_held, save_frontiers
from adaround_core.calibration.graph_trace import NotSegmentable, trace_layer_graph
from adaround_core.calibration.held_frontiers import HELD_FRONTIERS, HeldFrontiers
from adaround_core.calibration.layer_capture import capture_layer_io
from adaround_core.calibration.layer_samples import LayerSamples
from adaround_core.calibration.one_pass_capture import OnePassCapture
from adaround_core.calibration.segmented_forward import Frontier, advance, start, writes_nothing
from adaround_core.quant.fake_quantize import FakeQuantize, FakeQuantState
from adaround_core.quant.model_modes import eval_mode, fake_quant_state, float_reference
from adaround_core.quant.quant_layers import QuantLayerMixin, quant_layers
from adaround_core.quantization import prepare_qat_fx, set_fake_quantize, weight_reconstruction
from adaround_core.reconstruction import weight_reconstruction as wr
from adaround_core.reconstruction.layer_reconstruction import (
    layer_generator,
    nearest_weight,
    reconstruct_layer,
)
from adaround_core.reconstruction.reconstruction_config import AdaRoundConfig

LEAVES = (QuantLayerMixin, FakeQuantize)
CFG = {"num_steps": 12, "progress": False}


class ResidualCNN(nn.Module):
    """torchvision-style basic blocks: BN, in-place ReLU, ``out += identity``, a
    downsampling shortcut, global pooling and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.c1, self.b1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c3, self.b3 = nn.Conv2d(4, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8)
        self.down = nn.Sequential(nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.stem(x)))
        out = self.b2(self.c2(self.relu(self.b1(self.c1(x)))))
        out += x
        x = self.relu(out)
        out = self.b3(self.c3(x))
        out += self.down(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.relu(out), 1), 1))


class Branching(nn.Module):
    """Two branches from one tensor, concatenated, then a 1x1 conv and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.left = nn.Conv2d(4, 4, 3, padding=1)
        self.right = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(4, 2, 1))
        self.mix = nn.Conv2d(6, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.cat([torch.relu(self.left(x)), self.right(x)], dim=1)
        return self.head(self.mix(x).mean(dim=(2, 3)))


class TinyAttention(nn.Module):
    """One self-attention block by hand: q/k/v Linear, softmax, matmul, residual, LayerNorm."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-2, -1) / x.shape[-1] ** 0.5
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        x = self.norm(x + self.proj(torch.softmax(scores, dim=-1) @ self.v(x)))
        return self.head(x.mean(1))


class SharedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.shared = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(torch.relu(self.shared(self.first(x))))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        return self.b(x) if x.sum() > 0 else self.b(-x)


def _calibrated(model: nn.Module, shape: tuple[int, ...], num_batches: int = 3):
    torch.manual_seed(0)
    model = model.eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    batches = [torch.randn(*shape) for _ in range(num_batches)]
    q = prepare_qat_fx(model)
    set_fake_quantize(q, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for b in batches:
            q(b)
    return q, batches


def _both_paths(monkeypatch, model, shape, device="cpu", cfg=CFG):
    q, batches = _calibrated(model, shape)
    q.to(device)
    batches = [b.to(device) for b in batches]
    old = copy.deepcopy(q)
    monkeypatch.setattr(wr, "ONE_PASS_CAPTURE", False)
    old_report = weight_reconstruction(old, batches, None, cfg)
    monkeypatch.setattr(wr, "ONE_PASS_CAPTURE", True)
    new_report = weight_reconstruction(q, batches, None, cfg)
    return (q, new_report), (old, old_report)


def _assert_identical(new, old):
    (q, new_report), (ref, old_report) = new, old
    assert new_report.capture_method == ONE_PASS and new_report.capture_note == ""
    assert old_report.capture_method == PER_LAYER
    for name, layer in quant_layers(q).items():
        assert torch.equal(layer.weight, quant_layers(ref)[name].weight), name
    key = [(r.name, r.nearest_mse, r.adaround_mse, r.decision) for r in new_report]
    assert key == [(r.name, r.nearest_mse, r.adaround_mse, r.decision) for r in old_report]


@pytest.mark.parametrize(("model", "shape"), [
    (ResidualCNN, (4, 3, 8, 8)),
    (Branching, (4, 3, 6, 6)),
    (TinyAttention, (4, 5, 8)),
])
def test_one_pass_rounds_bit_identically_to_per_layer_passes(monkeypatch, model, shape, device):
    new, old = _both_paths(monkeypatch, model(), shape, device)
    _assert_identical(new, old)
    assert len(new[1]) == len(quant_layers(new[0]))


def test_kwargs_batches_with_an_optional_mask(monkeypatch):
    q, _ = _calibrated(TinyAttention(), (4, 5, 8))
    mask = torch.zeros(4, 5, 5, dtype=torch.bool)
    mask[:, :, -1] = True
    batches = [{"x": torch.randn(4, 5, 8), "mask": mask} for _ in range(3)]
    old = copy.deepcopy(q)
    monkeypatch.setattr(wr, "ONE_PASS_CAPTURE", False)
    old_report = weight_reconstruction(old, batches, None, CFG)
    monkeypatch.setattr(wr, "ONE_PASS_CAPTURE", True)
    _assert_identical((q, weight_reconstruction(q, batches, None, CFG)), (old, old_report))


@pytest.mark.parametrize(("model", "reason"), [
    (SharedTwice, "layer 'shared' is called 2 times"),
    (DataDependent, "torch.fx cannot trace the model"),
])
def test_fallback_warns_and_reports_why(monkeypatch, caplog, model, reason):
    with caplog.at_level(logging.WARNING):
        new, old = _both_paths(monkeypatch, model(), (6, 4))
    assert new[1].capture_method == PER_LAYER and reason in new[1].capture_note
    assert any("one-pass capture does not apply" in r.message and reason in r.message
               for r in caplog.records)
    for name, layer in quant_layers(new[0]).items():
        assert torch.equal(layer.weight, quant_layers(old[0])[name].weight), name


def _capture_state(model, shape, num_batches=4):
    q, batches = _calibrated(model, shape, num_batches)
    with eval_mode(q), fake_quant_state(q, FakeQuantState.VALIDATION):
        order = list(wr.rounding_order(q, batches[0], [])[0])
    return q, batches, order


def test_each_layer_runs_once_per_batch_during_capture():
    q, batches, order = _capture_state(ResidualCNN(), (2, 3, 8, 8))
    float_model = float_reference(q)
    calls = {name: 0 for name in order}
    for model in (q, float_model):
        for name in order:
            def count(module, args, name=name):
                calls[name] += 1
            model.get_submodule(name).register_forward_pre_hook(count)
    with eval_mode(q), fake_quant_state(q, FakeQuantState.VALIDATION):
        graph = trace_layer_graph(q, order, LEAVES, batches[0])
        capture = OnePassCapture(q, float_model, graph, order, batches)
        for name in order:
            quant_layers(q)[name].freeze_weight_qparams()
            capture.capture_layer_io(name)
    # per batch: once in the float pass, once in the quantized pass (the last layer's
    # quantized call is never needed: nothing after it is captured)
    assert calls == {name: 2 * len(batches) - (len(batches) if name == order[-1] else 0)
                     for name in order}


@pytest.mark.parametrize("one_pass", [True, False])
def test_weight_reconstruction_calls_each_layer_about_once_per_batch(monkeypatch, one_pass):
    q, batches = _calibrated(ResidualCNN(), (2, 3, 8, 8), num_batches=5)
    calls = dict.fromkeys(quant_layers(q), 0)
    for name, layer in quant_layers(q).items():  # the float copy inherits the hooks
        def count(module, args, name=name):
            calls[name] += 1
        layer.register_forward_pre_hook(count)
    monkeypatch.setattr(wr, "ONE_PASS_CAPTURE", one_pass)
    weight_reconstruction(q, batches, None, CFG)
    first = calls["stem"]
    if one_pass:  # per batch once in each model, plus the first batch's layer order and
        assert first == 2 * len(batches) + 3  # the graph check and its eager reference
    else:  # the first layer runs in both models in every layer's capture
        assert first == 2 * len(batches) * len(calls) + 1


def test_frontiers_spilled_to_disk_give_the_samples_of_per_layer_passes(monkeypatch, tmp_path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    q, batches, order = _capture_state(Branching(), (2, 3, 6, 6))
    float_model = float_reference(q)
    with eval_mode(q), fake_quant_state(q, FakeQuantState.VALIDATION):
        graph = trace_layer_graph(q, order, LEAVES, batches[0])
        capture = OnePassCapture(q, float_model, graph, order, batches, memory_budget=0)
        cfg = AdaRoundConfig.from_dict(CFG)
        for name in order:
            layer = quant_layers(q)[name]
            layer.freeze_weight_qparams()
            x, y = capture.capture_layer_io(name)
            last = name == order[-1]  # no later layer continues its passes: none are kept
            assert capture.frontiers_on_disk == (0 if last else 2 * len(batches))
            ref_x, ref_y = capture_layer_io(q, float_model, name, 1, batches)
            assert all(torch.equal(a, b) for a, b in zip(x + y, ref_x + ref_y, strict=True))
            generator = layer_generator(0, name)  # round it: the next inputs depend on it
            reconstruct_layer(name, layer, LayerSamples.from_tensors(x, y, 0.1, generator),
                              cfg, generator)
        capture.close()
    assert os.listdir(tmp_path) == []  # the temporary directory is gone


def test_frontier_store_spills_past_its_budget():
    store = frontier_store.FrontierStore(memory_budget=100)
    small = start_values = {"a": torch.zeros(10)}  # 40 bytes
    store.put(0, _frontier(start_values))
    store.put(1, _frontier({"a": torch.zeros(20), "v": torch.zeros(40)[:5], "n": 3}))
    store.put(2, _frontier(small))
    assert store.spilled == 1 and len(store) == 3
    restored = store.take(1)
    assert restored.values["n"] == 3 and restored.values["v"].shape == (5,)
    store.close()


def _frontier(values):
    from adaround_core.calibration.segmented_forward import Frontier
    return Frontier(7, dict(values))


def test_saved_frontiers_continue_the_pass_in_another_process(tmp_path):
    q, batches, order = _capture_state(ResidualCNN(), (2, 3, 8, 8), num_batches=2)
    with eval_mode(q), fake_quant_state(q, FakeQuantState.VALIDATION):
        graph = trace_layer_graph(q, order, LEAVES, batches[0])
        stop = graph.layer_calls[order[3]]
        frontiers = [advance(graph, q, start(graph, b), stop) for b in batches]
        assert save_frontiers(tmp_path, frontiers, graph.fingerprint) == 2
        again = trace_layer_graph(copy.deepcopy(q), order, LEAVES, batches[0])  # a rebuilt model
        loaded = list(load_frontiers(tmp_path, again.fingerprint))
        end = again.layer_calls[order[-1]]
        for fresh, back in zip(frontiers, loaded, strict=True):
            assert back.position == stop and back.values.keys() == fresh.values.keys()
            a = advance(graph, q, fresh, end).values
            b = advance(again, q, back, end).values
            assert all(torch.equal(a[k], b[k]) for k in a)
        with pytest.raises(frontier_store.CorruptCacheError, match="another traced graph"):
            next(load_frontiers(tmp_path, "0" * 64))
        file = tmp_path / "frontier_00001.pt"
        values = torch.load(file, weights_only=True)  # well-formed, one tensor changed
        changed = next(k for k, v in values.items() if isinstance(v, torch.Tensor))
        values[changed] = values[changed] + 1
        torch.save(values, file)
        with pytest.raises(frontier_store.CorruptCacheError, match="checksum"):
            list(load_frontiers(tmp_path, graph.fingerprint))
        file.write_bytes(b"garbage")
        with pytest.raises(frontier_store.CorruptCacheError, match="cannot be read"):
            list(load_frontiers(tmp_path, graph.fingerprint))


def test_layers_must_be_asked_in_order():
    q, batches, order = _capture_state(Branching(), (2, 3, 6, 6))
    with eval_mode(q), fake_quant_state(q, FakeQuantState.VALIDATION):
        graph = trace_layer_graph(q, order, LEAVES, batches[0])
        capture = OnePassCapture(q, float_reference(q), graph, order, batches)
        with pytest.raises(ValueError, match="out of order"):
            capture.capture_layer_io(order[1])


@pytest.mark.parametrize(("build", "reason"), [
    (lambda q: q.q.register_forward_hook(lambda *a: None), None),
    (lambda q: q.register_forward_hook(lambda *a: None), "forward hook"),
    (lambda q: nn.modules.module.register_module_forward_hook(lambda *a: None),
     "global module forward hooks"),
])
def test_hooks_the_graph_cannot_replay_stop_segmentation(build, reason):
    q, batches = _calibrated(TinyAttention(), (2, 5, 8))
    order = list(wr.rounding_order(q, batches[0], [])[0])
    handle = build(q)
    try:
        if reason is None:  # a hook on a layer is called by the graph like any module call
            trace_layer_graph(q, order, LEAVES, batches[0])
            return
        with pytest.raises(NotSegmentable, match=reason):
            trace_layer_graph(q, order, LEAVES, batches[0])
    finally:
        if handle is not None:
            handle.remove()


def test_a_direct_read_of_a_layer_weight_stops_segmentation():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(x)) + F.linear(x, self.b.weight)

    q, batches = _calibrated(Tied(), (2, 4))
    order = list(wr.rounding_order(q, batches[0], [])[0])
    with pytest.raises(NotSegmentable, match="reads 'b.weight' directly"):
        trace_layer_graph(q, order, LEAVES, batches[0])


def test_capturer_falls_back_when_the_graph_disagrees_with_eager(monkeypatch, caplog):
    q, batches = _calibrated(Branching(), (2, 3, 6, 6))
    order = list(wr.rounding_order(q, batches[0], [])[0])
    monkeypatch.setattr("adaround_core.calibration.capture_method.matches_eager",
                        lambda *a: False)
    with caplog.at_level(logging.WARNING):
        capturer = layer_capturer(q, float_reference(q), order, batches, batches[0], LEAVES)
    assert capturer.method == PER_LAYER and "differs from the eager" in capturer.note


def _round_nearest(model, name):
    layer = quant_layers(model)[name]
    layer.freeze_weight_qparams()
    with torch.no_grad():
        layer.weight.copy_(nearest_weight(layer))


def test_a_saved_capture_resumes_where_it_stopped(tmp_path):
    q, batches, order = _capture_state(ResidualCNN(), (2, 3, 8, 8), num_batches=3)
    whole, split = q, copy.deepcopy(q)
    with eval_mode(whole), fake_quant_state(whole, FakeQuantState.VALIDATION), \
            eval_mode(split), fake_quant_state(split, FakeQuantState.VALIDATION):
        graph = trace_layer_graph(whole, order, LEAVES, batches[0])
        reference = OnePassCapture(whole, float_reference(whole), graph, order, batches)
        expected = {}
        for name in order:
            _round_nearest(whole, name)
            expected[name] = reference.capture_layer_io(name)
        first = OnePassCapture(split, float_reference(split), graph, order, batches,
                               memory_budget=0)  # saved from disk: the spilled path
        for name in order[:3]:
            _round_nearest(split, name)
            first.capture_layer_io(name)
        first.save(tmp_path)
        first.close()
        rebuilt = copy.deepcopy(split)  # another process: same model, same roundings
        with fake_quant_state(rebuilt, FakeQuantState.VALIDATION):
            again = trace_layer_graph(rebuilt, order, LEAVES, batches[0])
            resumed = OnePassCapture.resume(rebuilt, float_reference(rebuilt), again, tmp_path)
            assert resumed.pending == order[3:]
            for name in order[3:]:
                _round_nearest(rebuilt, name)
                x, y = resumed.capture_layer_io(name)
                assert all(torch.equal(a, b) for a, b in
                           zip(x + y, expected[name][0] + expected[name][1], strict=True)), name


def test_streamed_frontiers_equal_saved_ones_and_continue_the_pass(tmp_path):
    """A ``sink`` gets the boundary as ``save`` writes it, batch by batch, while the layer is
    read: the same files' contents, a resume from it continues bit for bit, and so does the
    streaming capture itself (from its directory)."""
    q, batches, order = _capture_state(ResidualCNN(), (2, 3, 8, 8), num_batches=3)
    with eval_mode(q), fake_quant_state(q, FakeQuantState.VALIDATION):
        graph = trace_layer_graph(q, order, LEAVES, batches[0])
        reference = OnePassCapture(q, float_reference(q), graph, order, batches)
        expected = {name: reference.capture_layer_io(name) for name in order}
        saved = OnePassCapture(q, float_reference(q), graph, order, batches)
        saved.capture_layer_io(order[0])
        (tmp_path / "saved").mkdir()
        saved.save(tmp_path / "saved")
        streamed = OnePassCapture(q, float_reference(q), graph, order, batches)
        (tmp_path / "streamed").mkdir()
        pairs = list(streamed.iter_layer_io(order[0], sink=tmp_path / "streamed"))
        x, y = [a for a, _ in pairs], [b for _, b in pairs]
        assert all(torch.equal(a, b) for a, b in zip(x + y, expected[order[0]][0]
                                                     + expected[order[0]][1], strict=True))
        for part in ("quant", "float"):
            for i in range(3):
                a = torch.load(tmp_path / "saved" / part / f"frontier_{i:05d}.pt")
                b = torch.load(tmp_path / "streamed" / part / f"frontier_{i:05d}.pt")
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a
                                                    if isinstance(a[k], torch.Tensor))
        resumed = OnePassCapture.resume(q, float_reference(q), graph, tmp_path / "streamed")
        for capture in (resumed, streamed):  # another process's, and the streaming one's
            for name in order[1:]:
                x, y = capture.capture_layer_io(name)
                assert all(torch.equal(a, b) for a, b in
                           zip(x + y, expected[name][0] + expected[name][1], strict=True)), name
        with pytest.raises(ValueError, match="nothing held to save"):
            OnePassCapture.resume(q, float_reference(q), graph, tmp_path / "streamed").save(
                tmp_path)


def _streamed(q, graph, order, batches, sink, hold_budget):
    """The first layer streamed into ``sink``, holding up to ``hold_budget`` bytes."""
    capture = OnePassCapture(q, float_reference(q), graph, order, batches,
                             hold_budget=hold_budget)
    sink.mkdir()
    for _ in capture.iter_layer_io(order[0], sink=sink):
        pass
    return capture


@pytest.fixture
def no_spill_reserve(monkeypatch):
    """Budgets placed by the frontiers' own sizes: no room kept for a spill's."""
    monkeypatch.setattr(frontier_store.FrontierWriter, "spill_reserve", lambda self, size: 0)


@pytest.mark.parametrize("held", ["all", "first batch"])
def test_frontiers_held_in_memory_continue_like_written_ones(tmp_path, held, no_spill_reserve):
    """With a hold budget a sink keeps frontiers in this process's memory instead of files
    (all of them, or those that fit, the rest written); a resume takes them back and
    captures bit for bit what per-layer passes give, and nothing stays held."""
    q, batches, order = _capture_state(ResidualCNN(), (2, 3, 8, 8), num_batches=3)
    with eval_mode(q), fake_quant_state(q, FakeQuantState.VALIDATION):
        graph = trace_layer_graph(q, order, LEAVES, batches[0])
        reference = OnePassCapture(q, float_reference(q), graph, order, batches)
        expected = {name: reference.capture_layer_io(name) for name in order}
        before = HELD_FRONTIERS.nbytes
        _streamed(q, graph, order, batches, tmp_path / "sizes", 1 << 40)
        per_batch = (HELD_FRONTIERS.nbytes - before) // 3  # both parts of one batch
        release_held(tmp_path / "sizes")
        assert HELD_FRONTIERS.nbytes == before
        budget = 1 << 40 if held == "all" else before + per_batch
        _streamed(q, graph, order, batches, tmp_path / "sink", budget)
        files = sorted(p.name for p in (tmp_path / "sink").rglob("frontier_*.pt"))
        assert len(files) == (0 if held == "all" else 4)  # batches 1 and 2, both parts
        resumed = OnePassCapture.resume(q, float_reference(q), graph, tmp_path / "sink",
                                        consume=True)
        for name in order[1:]:
            x, y = resumed.capture_layer_io(name)
            assert all(torch.equal(a, b) for a, b in
                       zip(x + y, expected[name][0] + expected[name][1], strict=True)), name
        assert HELD_FRONTIERS.nbytes == before


def test_the_held_bytes_stay_within_the_budget_through_offers_takes_and_drops():
    """Every held frontier counts once (a shared storage once) until it is taken or its
    boundary dropped; an offer that would pass the budget, or repeats a key, is refused.
    What was offered (a new key), taken or dropped counts as moved."""
    held = HeldFrontiers()
    shared = torch.zeros(10)  # 40 bytes
    frontier = Frontier(0, {"a": shared, "b": shared[:5], "c": torch.zeros(5)})  # 60 bytes
    assert held.offer("t1", 0, frontier, budget=100)
    assert not held.offer("t1", 1, frontier, budget=100)  # 120 > 100
    assert not held.offer("t1", 0, frontier, budget=1000)  # the same key again
    assert held.offer("t1", 1, frontier, budget=120) and held.offer("t2", 0, frontier, 180)
    assert held.nbytes == 180
    assert held.moved == 240  # four offers of new keys, one of them refused (written)
    assert held.take("t1", 0) is frontier and held.take("t1", 0) is None
    assert held.nbytes == 120 and held.holds("t1", 1) and not held.holds("t1", 0)
    assert held.moved == 300
    held.drop({"t1", "t3"})
    assert held.nbytes == 60 and not held.holds("t1", 1) and held.holds("t2", 0)
    held.drop({"t2"})
    assert held.nbytes == 0 and held.moved == 420


def test_held_frontiers_another_process_lacks_are_unusable(tmp_path):
    """A boundary whose held frontiers this process does not hold (written by another one,
    or dropped) cannot be resumed: :class:`CorruptCacheError` says why; a capture
    abandoned midway holds nothing."""
    q, batches, order = _capture_state(ResidualCNN(), (2, 3, 8, 8), num_batches=3)
    with eval_mode(q), fake_quant_state(q, FakeQuantState.VALIDATION):
        graph = trace_layer_graph(q, order, LEAVES, batches[0])
        before = HELD_FRONTIERS.nbytes
        _streamed(q, graph, order, batches, tmp_path / "sink", 1 << 40)
        assert HELD_FRONTIERS.nbytes > before
        release_held(tmp_path / "sink")  # as when the process that wrote them ended
        with pytest.raises(frontier_store.CorruptCacheError, match="held in the memory"):
            OnePassCapture.resume(q, float_reference(q), graph, tmp_path / "sink")
        capture = OnePassCapture(q, float_reference(q), graph, order, batches,
                                 hold_budget=1 << 40)
        (tmp_path / "abandoned").mkdir()
        pairs = capture.iter_layer_io(order[0], sink=tmp_path / "abandoned")
        next(pairs)
        assert HELD_FRONTIERS.nbytes > before
        pairs.close()
        assert HELD_FRONTIERS.nbytes == before


def test_a_budget_keeps_room_for_the_frontiers_a_spill_has_in_memory(tmp_path):
    """A writer holds a frontier only while the held bytes plus a spill's own (``depth``
    writes waiting and one frontier read back, each this frontier's size) fit the budget;
    the rest is written, and the boundary reads back whole and in order."""
    held_before = HELD_FRONTIERS.nbytes
    frontiers = [Frontier(0, {"x": torch.full((10,), float(i))}) for i in range(5)]  # 40 B
    writer = frontier_store.FrontierWriter(tmp_path, "graph", hold_budget=held_before + 200)
    assert writer.spill_reserve(frontiers[0].nbytes()) == (writer._writes.depth + 1) * 40
    for frontier in frontiers:
        writer.write(frontier)
    assert writer.finish() == 5
    room = 200 - writer.spill_reserve(frontiers[0].nbytes())  # 80 bytes: two frontiers held
    assert HELD_FRONTIERS.nbytes - held_before == room
    assert sorted(p.name for p in tmp_path.glob("frontier_*.pt")) == \
        [f"frontier_{i:05d}.pt" for i in (2, 3, 4)]
    loaded = [f.values["x"][0].item() for f in load_frontiers(tmp_path, "graph")]
    assert loaded == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert HELD_FRONTIERS.nbytes == held_before


def test_a_boundary_whose_last_write_fails_holds_nothing(tmp_path, monkeypatch,
                                                          no_spill_reserve):
    """The files are written behind the capture: a write that fails after the last batch
    (the disk fills) is raised when the boundary is finished, and the frontiers held in
    memory for it are let go of as for any abandoned capture."""
    q, batches, order = _capture_state(ResidualCNN(), (2, 3, 8, 8), num_batches=3)
    write = frontier_store.FrontierWriter._write_file

    def full_disk(self, index, values):
        if index == 2:
            raise OSError(28, "No space left on device")
        return write(self, index, values)

    monkeypatch.setattr(frontier_store.FrontierWriter, "_write_file", full_disk)
    with eval_mode(q), fake_quant_state(q, FakeQuantState.VALIDATION):
        graph = trace_layer_graph(q, order, LEAVES, batches[0])
        before = HELD_FRONTIERS.nbytes
        _streamed(q, graph, order, batches, tmp_path / "sizes", 1 << 40)
        per_batch = (HELD_FRONTIERS.nbytes - before) // 3
        release_held(tmp_path / "sizes")
        with pytest.raises(OSError, match="No space left"):
            _streamed(q, graph, order, batches, tmp_path / "sink", before + per_batch)
        assert HELD_FRONTIERS.nbytes == before
        assert not (tmp_path / "sink" / "capture.json").exists()


def test_a_consuming_resume_deletes_each_frontier_once_read(tmp_path):
    """``resume(consume=True)`` gives the same capture and leaves no frontier file behind;
    the consumed directory cannot be resumed again (it is incomplete), nor can one that an
    interrupted capture consumed in part."""
    q, batches, order = _capture_state(ResidualCNN(), (2, 3, 8, 8), num_batches=3)
    with eval_mode(q), fake_quant_state(q, FakeQuantState.VALIDATION):
        graph = trace_layer_graph(q, order, LEAVES, batches[0])
        reference = OnePassCapture(q, float_reference(q), graph, order, batches)
        expected = [reference.capture_layer_io(name) for name in order[:2]][1]
        first = OnePassCapture(q, float_reference(q), graph, order, batches)
        first.capture_layer_io(order[0])
        for copy_dir in ("whole", "part"):
            (tmp_path / copy_dir).mkdir()
            first.save(tmp_path / copy_dir)
        resumed = OnePassCapture.resume(q, float_reference(q), graph, tmp_path / "whole",
                                        consume=True)
        x, y = resumed.capture_layer_io(order[1])
        assert all(torch.equal(a, b) for a, b in zip(x + y, expected[0] + expected[1],
                                                     strict=True))
        assert list((tmp_path / "whole").rglob("frontier_*.pt")) == []
        with pytest.raises(frontier_store.CorruptCacheError, match="incomplete"):
            OnePassCapture.resume(q, float_reference(q), graph, tmp_path / "whole")
        interrupted = OnePassCapture.resume(q, float_reference(q), graph, tmp_path / "part",
                                            consume=True)
        next(interrupted.iter_layer_io(order[1]))  # killed after the first batch
        with pytest.raises(frontier_store.CorruptCacheError, match="incomplete"):
            OnePassCapture.resume(q, float_reference(q), graph, tmp_path / "part")


class PooledStem(nn.Module):
    """A stem through an in-place ReLU and max pooling; then an in-place ``relu_`` method
    after one conv, and after the next a module of the model's own that scales in place
    (traced into its ``mul_``)."""

    class Halve(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mul_(0.5)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.halve = PooledStem.Halve()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.stem(x)))
        x = self.c2(self.c1(x).relu_())
        return self.head(self.halve(x).mean(dim=(2, 3)))


def test_the_float_pass_moves_on_to_the_next_call_without_writing_into_any_tensor(tmp_path):
    """After a layer's target is taken, the paused float pass runs on towards the next
    layer's call, through an in-place ReLU module (run out of place) and pooling, but not
    through a ``relu_`` or a ``mul_``: each boundary's float frontier is
    at the next call or before the first such node; every layer's pairs stay
    bit-identical to the per-layer capture, and the ReLU is in place again afterwards."""
    q, batches, order = _capture_state(PooledStem(), (2, 3, 8, 8), num_batches=2)
    with eval_mode(q), fake_quant_state(q, FakeQuantState.VALIDATION):
        graph = trace_layer_graph(q, order, LEAVES, batches[0])
        capture = OnePassCapture(q, float_reference(q), graph, order, batches)
        positions = {}
        for name in order:
            sink = tmp_path / name
            sink.mkdir()
            pairs = list(capture.iter_layer_io(name, sink=sink))
            expected = capture_layer_io(q, float_reference(q), name, 1, batches)
            assert all(torch.equal(a, b) for a, b in zip(
                [x for x, _ in pairs] + [y for _, y in pairs], expected[0] + expected[1],
                strict=True)), name
            if name != order[-1]:
                positions[name] = next(load_frontiers(sink / "float", graph.fingerprint)).position
                capture = OnePassCapture.resume(q, float_reference(q), graph, sink)
        assert q.relu.inplace and float_reference(q).relu.inplace
    node_at = {node.target: i for i, node in enumerate(graph.nodes) if node.op == "call_method"}
    assert order == ["stem", "c1", "c2", "head"]
    assert positions["stem"] == graph.layer_calls["c1"]  # through the ReLU and the pool
    assert positions["c1"] == node_at["relu_"]  # stopped before the in-place method
    assert positions["c2"] == node_at["mul_"]  # and before the model's own in-place scaling


def test_only_known_out_of_place_nodes_count_as_writing_nothing():
    class Ops(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            a = F.relu(x, inplace=True)
            b = torch.add(a, 1).view(-1)
            c = b.add_(1)
            return self.relu(torch.sin(c))

    model = Ops()
    verdicts = {n.name: writes_nothing(n, model) for n in fx.symbolic_trace(model).graph.nodes
                if n.op not in ("placeholder", "output")}
    assert verdicts == {"relu": False, "add": True, "view": True, "add_": False, "sin": False,
                        "relu_1": True}
    model.relu.register_forward_hook(lambda *args: None)  # a hook may do anything
    relu_node = next(n for n in fx.symbolic_trace(model).graph.nodes if n.target == "relu")
    assert not writes_nothing(relu_node, model)
