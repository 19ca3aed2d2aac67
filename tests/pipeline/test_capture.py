"""One-pass capture in the adaround stage: each layer's task continues the forward pass the
previous layer's task left paused (its frontiers), with the per-layer method's bytes."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest

from adaround_core.quant.quant_layers import QuantLayerMixin, quant_layers
from flows.stages import adaround_flow
from tasks import capture
from tasks.io import read_json
from tasks.layout import Layout, existing
from tasks.model_state import calibrated_model

CHECKPOINT = Path("checkpoints") / "adaround.safetensors"
FRONTIERS = Path("cache") / "frontiers"
ACTIVATIONS = Path("cache") / "activations"
NUM_BATCHES = 4  # tiny params: 64 calibration samples in batches of 16
# Layer calls outside capture: the plan's ordering pass, its cache-size pass, and the capture
# check's eager and traced passes (one batch each, quantized model).
PLAN_CALLS = 4
PER_LAYER_PLAN_CALLS = 2  # the ordering and cache-size passes (no capture check)


def _counting(monkeypatch) -> Counter:
    """Calls of every quantized layer's forward (both models), by weight shape."""
    calls: Counter = Counter()
    forward = QuantLayerMixin.forward

    def counted(self, x, *args, **kwargs):
        calls[tuple(self.weight.shape)] += 1
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(QuantLayerMixin, "forward", counted)
    return calls


def _shapes(project: Path, pipe) -> dict[str, tuple]:
    """Weight shape by layer name (and the process's prepared model built, whose BatchNorm
    folding pass would otherwise be counted)."""
    params = pipe.params(project)
    layout = Layout(params)
    model = calibrated_model(params, existing(layout.dataset, "data"),
                             existing(layout.float_checkpoint, "train"),
                             existing(layout.calibrated_checkpoint, "calibrate"))
    shapes = {name: tuple(layer.weight.shape) for name, layer in quant_layers(model).items()}
    assert len(set(shapes.values())) == len(shapes), "shapes must tell the layers apart"
    return shapes


def _run(project: Path, pipe, monkeypatch, caplog=None) -> tuple[dict[str, int], str]:
    """The adaround stage in-process: layer calls during it, and its log (with ``caplog``)."""
    if caplog is not None:
        caplog.clear()
    logs = caplog.at_level(logging.INFO) if caplog is not None else contextlib.nullcontext()
    shapes = _shapes(project, pipe)
    with monkeypatch.context() as patch, logs:
        calls = _counting(patch)
        assert adaround_flow(pipe.params(project), return_state=True).is_completed()
        counted = {name: calls[shape] for name, shape in shapes.items()}
    return counted, caplog.text if caplog is not None else ""


def _dirs(project: Path, folder: Path) -> list[str]:
    root = project / folder
    return sorted(p.name.split("--")[0] for p in root.iterdir()) if root.is_dir() else []


@pytest.fixture(scope="module")
def per_layer(prefect_harness, tmp_path_factory, tiny_checkpoints, pipe):
    """The stage with the per-layer method (the pipeline before one-pass capture)."""
    project = pipe.project(tmp_path_factory.mktemp("per-layer"), tiny_checkpoints,
                           {"runtime": {"keep_cache": False}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(capture, "ONE_PASS_CAPTURE", False)
        calls, _ = _run(project, pipe, patch)
    return project, calls


def test_one_pass_runs_each_layer_about_once_per_batch_with_the_per_layer_bytes(
        prefect_harness, tmp_path, tiny_checkpoints, pipe, per_layer, caplog, monkeypatch):
    old_project, old_calls = per_layer
    project = pipe.project(tmp_path / "p", tiny_checkpoints, {"runtime": {"keep_cache": False}})
    calls, log = _run(project, pipe, monkeypatch, caplog)

    # one pass of the quantized model (stopping before the last layer) and one of the float
    # model over the calibration batches, in all five layers' tasks together
    last = pipe.layers[-1]
    assert calls == {name: (1 if name == last else 2) * NUM_BATCHES + PLAN_CALLS
                     for name in pipe.layers}, calls
    # the per-layer method: layer i runs in the float passes of layers i.. and the
    # quantized passes of layers i+1..
    size = len(pipe.layers)
    assert old_calls == {name: (2 * (size - i) - 1) * NUM_BATCHES + PER_LAYER_PLAN_CALLS
                         for i, name in enumerate(pipe.layers)}, old_calls
    assert (project / CHECKPOINT).read_bytes() == (old_project / CHECKPOINT).read_bytes()

    for name, before in zip(pipe.layers, [None, *pipe.layers], strict=False):
        source = "from the model input" if before is None else f"continued from {project}"
        assert any(f"{name}: cached 64 samples" in line and source in line
                   for line in log.splitlines()), (name, log[-3000:])
    rows = read_json(Layout(pipe.params(project)).layer_report)
    assert {(r["capture_method"], r["capture_note"]) for r in rows} == {("one_pass", "")}
    old_rows = read_json(Layout(pipe.params(old_project)).layer_report)
    assert {(r["capture_method"], r["capture_note"]) for r in old_rows} == \
        {("per_layer", "one-pass capture switched off")}
    # a finished layer's frontiers and cache are gone (runtime.keep_cache is off)
    assert _dirs(project, FRONTIERS) == [] and _dirs(project, ACTIVATIONS) == []


@pytest.fixture(scope="module")
def kept(prefect_harness, tmp_path_factory, tiny_checkpoints, pipe) -> Path:
    """A finished stage with ``runtime.keep_cache`` (the tiny default): caches and frontiers."""
    project = pipe.project(tmp_path_factory.mktemp("kept"), tiny_checkpoints)
    assert adaround_flow(pipe.params(project), return_state=True).is_completed()
    return project


def test_keep_cache_keeps_every_frontier_but_the_last_layers(kept, pipe):
    assert _dirs(kept, FRONTIERS) == sorted(pipe.layers[:-1])  # the last layer saves none
    assert _dirs(kept, ACTIVATIONS) == sorted(pipe.layers)
    for directory in (kept / FRONTIERS).iterdir():
        assert (directory / capture.KEY_FILE).read_text()[:24] == directory.name[-24:]


def _damage_frontier(directory: Path, damage: str) -> None:
    if damage == "missing":
        shutil.rmtree(directory)
    elif damage == "corrupt":
        victim = sorted(directory.rglob("frontier_*.pt"))[0]
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
    elif damage == "incomplete":  # killed while saving: no capture state
        (directory / "capture.json").unlink()
    else:  # saved for another key
        (directory / capture.KEY_FILE).write_text("0" * 64)


@pytest.mark.parametrize("damage", ["missing", "corrupt", "incomplete", "foreign"])
def test_resume_without_a_usable_frontier_starts_over_with_the_same_bytes(
        kept, tmp_path, pipe, caplog, monkeypatch, damage):
    project = Path(shutil.copytree(kept, tmp_path / "p"))
    expected = (project / CHECKPOINT).read_bytes()
    for name in pipe.layers[2:]:  # conv3 onwards unfinished: results and caches gone
        for path in [*(project / "results" / "layers").glob(f"{name}--*"),
                     *(project / ACTIVATIONS).glob(f"{name}--*")]:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    (conv2,) = (project / FRONTIERS).glob("conv2--*")
    _damage_frontier(conv2, damage)
    (conv3,) = (project / FRONTIERS).glob("conv3--*")  # in the way of conv3's own save:
    (conv3 / "capture.json").unlink()  # replaced, since fc1 continues from it below

    calls, log = _run(project, pipe, monkeypatch, caplog)
    assert pipe.layer_counts(log) == (3, 2)
    assert (project / CHECKPOINT).read_bytes() == expected
    conv3 = next(line for line in log.splitlines() if "conv3: cached 64 samples" in line)
    assert "from the model input" in conv3
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if damage == "missing":
        assert "conv3: no saved frontiers of conv2" in log and not warned
    else:
        assert len(warned) == 1 and f"frontiers {conv2} are unusable" in warned[0], warned
        assert not conv2.exists() or damage == "missing"  # deleted, then not rewritten
    assert any("fc1: cached 64 samples" in line and "continued from" in line
               for line in log.splitlines())
    # conv3 started from the input: its quantized pass ran conv1, conv2 once more per batch
    assert calls["conv1"] == calls["conv2"] == NUM_BATCHES * 2 + PLAN_CALLS


def test_a_model_that_cannot_be_traced_falls_back_to_per_layer_capture(
        prefect_harness, tmp_path, tiny_checkpoints, pipe, kept, caplog, monkeypatch):
    project = pipe.project(tmp_path / "p", tiny_checkpoints,
                           {"model": {"factory": "untraceable:BranchyDigitsCNN",
                                      "kwargs": {"width": 4}},
                            "runtime": {"keep_cache": False}})
    calls, log = _run(project, pipe, monkeypatch, caplog)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned  # said once per run, by the plan
    assert warned[0].startswith("one-pass capture does not apply: torch.fx cannot trace")
    rows = read_json(Layout(pipe.params(project)).layer_report)
    assert {r["capture_method"] for r in rows} == {"per_layer"}
    assert all(r["capture_note"].startswith("torch.fx cannot trace the model") for r in rows)
    assert calls[pipe.layers[0]] == ((2 * len(pipe.layers) - 1) * NUM_BATCHES
                                     + PER_LAYER_PLAN_CALLS)
    assert _dirs(project, FRONTIERS) == []
    # the same numbers as the one-pass capture of the same network
    assert (project / CHECKPOINT).read_bytes() == (kept / CHECKPOINT).read_bytes()
