"""``runtime.device``: calibration, activation caching, AdaRound and evaluation run on the
chosen device; results computed on different devices never mix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tasks.activation_cache import cache_layer_activations
from tasks.calibration import calibrate
from tasks.evaluation import evaluate_models
from tasks.io import load_tensors
from tasks.layer_adaround import adaround_layer, assemble_checkpoint
from tasks.layer_jobs import LayerJob
from tasks.layout import Layout, existing
from tasks.model_state import compute_device
from tasks.params import PreflightError, parse_params
from tasks.planning import plan_layers
from tasks.preflight import preflight

HAS_CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "CPU", "mps"])
def test_an_unknown_device_is_an_error_naming_the_key(value):
    with pytest.raises(ValueError, match=r"runtime\.device"):
        parse_params({"runtime": {"device": value}})


@pytest.mark.skipif(HAS_CUDA, reason="checks the machine without a GPU")
def test_cuda_without_a_gpu_fails_in_preflight_naming_the_key():
    params = parse_params({"runtime": {"device": "cuda"}})
    with pytest.raises(PreflightError, match=r"runtime\.device: 'cuda' but this torch sees no"):
        preflight(params, "adaround")


def test_auto_is_cuda_where_present_else_the_cpu():
    device = compute_device(parse_params({"runtime": {"device": "auto"}}))
    assert device.type == ("cuda" if HAS_CUDA else "cpu")


def _inputs(project: Path, pipe):
    params = pipe.params(project)
    layout = Layout(params)
    return params, (existing(layout.dataset, "data"), existing(layout.float_checkpoint, "train"),
                    existing(layout.calibrated_checkpoint, "calibrate"))


def test_the_device_type_is_part_of_the_layer_keys(tmp_path, tiny_checkpoints, pipe,
                                                   monkeypatch):
    params, inputs = _inputs(pipe.project(tmp_path / "p", tiny_checkpoints), pipe)
    job = LayerJob(params, *inputs, "conv1", 1, ())
    cpu_keys = job.cache_key, job.result_key
    monkeypatch.setattr("tasks.layer_jobs.compute_device", lambda _: torch.device("cuda", 0))
    assert job.cache_key != cpu_keys[0] and job.result_key != cpu_keys[1]


def _round_all(params, inputs, out: Path) -> tuple[list, dict[str, float]]:
    """The adaround stage's task bodies (no Prefect run), then the evaluation."""
    plan = plan_layers.fn(params, *inputs)
    results = []
    for name in plan.names:
        job = LayerJob(params, *inputs, name, plan.calls[name], tuple(results))
        results.append(adaround_layer.fn(job, cache_layer_activations.fn(job)))
    rounded = assemble_checkpoint.fn(params, *inputs, results, str(out))
    return results, evaluate_models.fn(params, *inputs, rounded)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_the_stages_run_on_the_gpu_and_score_like_the_cpu(tmp_path, tiny_checkpoints, pipe):
    cpu_params, cpu_inputs = _inputs(pipe.project(tmp_path / "cpu", tiny_checkpoints), pipe)
    gpu_project = pipe.project(tmp_path / "gpu", tiny_checkpoints,
                               overrides={"runtime": {"device": "cuda"}})
    gpu_params, gpu_inputs = _inputs(gpu_project, pipe)
    assert compute_device(gpu_params).type == "cuda"
    # recalibrate on the GPU: observers and BatchNorm folding run there
    calibrated = calibrate.fn(gpu_params, gpu_inputs[0], gpu_inputs[1],
                              str(Layout(gpu_params).calibrated_checkpoint))
    gpu_inputs = (*gpu_inputs[:2], calibrated)
    cpu_results, cpu_scores = _round_all(cpu_params, cpu_inputs, tmp_path / "cpu.safetensors")
    gpu_results, gpu_scores = _round_all(gpu_params, gpu_inputs, tmp_path / "gpu.safetensors")
    assert [r.name for r in gpu_results] == [r.name for r in cpu_results]
    assert {r.path for r in gpu_results}.isdisjoint({r.path for r in cpu_results})
    for name in ("float", "baseline", "adaround"):
        assert gpu_scores[name] == pytest.approx(cpu_scores[name], abs=3.0), (gpu_scores,
                                                                            cpu_scores)
    state = load_tensors(tmp_path / "gpu.safetensors")
    assert all(t.device.type == "cpu" for t in state.values())  # checkpoints are portable
