"""Each layer is rounded with its own thread count; the setting is restored after it."""

from __future__ import annotations

import torch

from adaround_core.quantization import weight_reconstruction
from adaround_core.reconstruction import layer_reconstruction, threads
from adaround_core.reconstruction import unit_order as wr  # where the layer path is called

# TinyCNN on 4 x 3 x 6 x 6 batches: FLOPs of one step (forward + weight gradient), by hand
STEP_FLOPS = {"conv1": 2 * 2 * 4 * 36 * 4 * 27, "conv2": 2 * 2 * 4 * 36 * 4 * 36,
              "head": 2 * 2 * 4 * 4 * 3}


def _spy(monkeypatch) -> dict[str, list]:
    """Record the thread count around each layer and inside its optimisation."""
    seen: dict[str, list] = {"around": [], "inside": []}
    optimise, reconstruct = layer_reconstruction.optimise_rounding, wr.reconstruct_layer

    def optimise_spy(*args, **kwargs):
        seen["inside"].append(torch.get_num_threads())
        return optimise(*args, **kwargs)

    def reconstruct_spy(*args, **kwargs):
        seen["around"].append(torch.get_num_threads())
        report = reconstruct(*args, **kwargs)
        seen["around"].append(torch.get_num_threads())
        return report

    monkeypatch.setattr(layer_reconstruction, "optimise_rounding", optimise_spy)
    monkeypatch.setattr(wr, "reconstruct_layer", reconstruct_spy)
    return seen


def test_threads_follow_each_layers_work_and_are_restored(h, fast_cfg, monkeypatch):
    monkeypatch.setattr(threads, "AVAILABLE_CPU_THREADS", 2)
    monkeypatch.setattr(threads, "PARALLEL_MIN_STEP_FLOPS", STEP_FLOPS["conv2"])
    seen = _spy(monkeypatch)
    _, q, batches = h.calibrated_cnn()
    torch.set_num_threads(3)
    report = weight_reconstruction(q, batches, None, fast_cfg)
    assert torch.get_num_threads() == 3
    assert {r.name: r.step_flops for r in report} == STEP_FLOPS
    assert [r.threads for r in report] == seen["inside"] == [1, 2, 1]
    # capture's setting before and after every layer: sized by the largest layer (conv2's
    # forward on a calibration batch of the step's size is a step of conv2's size)
    assert seen["around"] == [2] * 6
    assert report.num_threads == 2
    assert [rec["threads"] for rec in report.to_records()] == [1, 2, 1]


def test_capture_stays_on_one_thread_below_the_threshold(h, fast_cfg, monkeypatch):
    monkeypatch.setattr(threads, "AVAILABLE_CPU_THREADS", 2)
    monkeypatch.setattr(threads, "PARALLEL_MIN_STEP_FLOPS", STEP_FLOPS["conv2"] + 1)
    seen = _spy(monkeypatch)
    _, q, batches = h.calibrated_cnn()
    report = weight_reconstruction(q, batches, None, fast_cfg)
    assert seen["around"] == [1] * 6 and report.num_threads == 1
    assert [r.threads for r in report] == [1, 1, 1]


def test_explicit_num_threads_holds_for_every_layer(h, fast_cfg, monkeypatch):
    monkeypatch.setattr(threads, "AVAILABLE_CPU_THREADS", 2)
    monkeypatch.setattr(threads, "PARALLEL_MIN_STEP_FLOPS", 1)
    seen = _spy(monkeypatch)
    _, q, batches = h.calibrated_cnn()
    report = weight_reconstruction(q, batches, None, {**fast_cfg, "num_threads": 1})
    assert [r.threads for r in report] == seen["inside"] == [1, 1, 1]
    assert torch.get_num_threads() == 1


def test_default_threshold_keeps_small_layers_on_one_thread(h, fast_cfg):
    _, q, batches = h.calibrated_cnn()
    report = weight_reconstruction(q, batches, None, fast_cfg)
    assert [r.threads for r in report] == [1, 1, 1]
