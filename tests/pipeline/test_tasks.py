"""Task bodies called as plain functions (``task.fn()``): what each one writes and returns."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from adaround_core.calibration.layer_capture import capture_layer_io
from adaround_core.calibration.layer_samples import LayerSamples
from adaround_core.calibration.sample_store import read_manifest
from adaround_core.quant.fake_quantize import FakeQuantState
from adaround_core.quant.model_modes import fake_quant_state
from adaround_core.quant.quant_layers import quant_layers
from adaround_core.reconstruction.layer_reconstruction import layer_generator, reconstruct_layer
from adaround_core.reconstruction.threads import intra_op_threads
from flows.runtime import make_task_runner
from tasks.activation_cache import cache_layer_activations
from tasks.artifacts import Artifact, LayerPlan, LayerResult
from tasks.data import prepare_data, validate_dataset
from tasks.evaluation import evaluate_models
from tasks.export import export_model
from tasks.io import file_digest, load_tensors, tensor_digest
from tasks.layer_adaround import adaround_layer, assemble_checkpoint
from tasks.layer_jobs import LayerJob
from tasks.layout import Layout, existing
from tasks.model_state import calibration_inputs, layer_models
from tasks.onnx_evaluation import ParityError, agreement, evaluate_onnx
from tasks.planning import plan_layers
from tasks.training import train_float_model


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_checkpoints, pipe) -> Path:
    return pipe.project(tmp_path_factory.mktemp("tasks"), tiny_checkpoints)


@pytest.fixture(scope="module")
def params(project, pipe):
    return pipe.params(project)


@pytest.fixture(scope="module")
def inputs(params) -> tuple[Artifact, Artifact, Artifact]:
    layout = Layout(params)
    return (existing(layout.dataset, "data"), existing(layout.float_checkpoint, "train"),
            existing(layout.calibrated_checkpoint, "calibrate"))


def _job(params, inputs, name: str, previous=(), calls: int = 1) -> LayerJob:
    return LayerJob(params, *inputs, name, calls, tuple(previous))


def test_prepare_data_writes_the_data_contract(tmp_path, params):
    artifact = prepare_data.fn(params, str(tmp_path / "dataset" / "manifest.json"))
    data = load_tensors(tmp_path / "dataset" / "tensors.safetensors")
    assert json.loads(artifact.file.read_text())["kind"] == "tensors"
    assert set(data) >= {"train_x", "train_y", "calib_x", "test_x", "test_y"}
    assert data["calib_x"].shape == (64, 1, 8, 8)
    assert artifact.digest == file_digest(artifact.file)
    with pytest.raises(ValueError, match="calib_x"):
        validate_dataset({"train_x": torch.zeros(1)}, "pkg:fn")
    with pytest.raises(ValueError, match="not a dict"):
        validate_dataset([1, 2], "pkg:fn")


def test_the_digits_metric_is_top1_over_the_evaluation_batches(params, inputs):
    from adaround_core.demo.training import top1, top1_metric
    from tasks.model_state import load_float_model
    from tasks.stage_data import open_data

    dataset, float_model, _ = inputs
    model = load_float_model(params, float_model.file)
    data = open_data(params, dataset)
    x, y = data.training()["test_x"], data.training()["test_y"]
    named = top1_metric(model, data.evaluation(), float_model=model)
    assert named == {"top1": top1(model, x, y, batch_size=params.eval.batch_size)}


def test_plan_layers_first_call_order_and_exclude_prefix(params, inputs, pipe):
    plan = plan_layers.fn(params, *inputs)
    assert plan.names == pipe.layers
    assert plan.calls == dict.fromkeys(pipe.layers, 1)
    fewer = params.model_copy(update={"adaround": params.adaround.model_copy(
        update={"exclude_prefix": ["fc", "head"]})})
    assert plan_layers.fn(fewer, *inputs).names == ["conv1", "conv2", "conv3"]


def test_cache_task_writes_verified_shards_once(params, inputs):
    job = _job(params, inputs, "conv2")
    artifact = cache_layer_activations.fn(job)
    directory = Path(artifact.path)
    manifest = read_manifest(directory, verify=True)
    assert sum(s.rows for s in manifest["inputs"]) == params.calibration.num_samples
    assert manifest["inputs"][0].row_shape == (4, 8, 8)  # conv2 input: width 4, 8x8
    assert manifest["targets"][0].row_shape == (4, 8, 8)
    stamp = (directory / "manifest.json").stat().st_mtime_ns
    assert cache_layer_activations.fn(job).path == artifact.path
    assert (directory / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rewritten


def test_disk_path_rounds_a_layer_exactly_as_the_in_memory_path(params, inputs):
    """One AdaRound implementation: the task (shards on disk) and the library's in-memory
    samples give the same rounded weight, bit for bit."""
    job = _job(params, inputs, "conv1")
    result = adaround_layer.fn(job, cache_layer_activations.fn(job))
    disk_weight = load_tensors(Path(result.path))["weight"]

    cfg = params.adaround
    model, reference = layer_models(job.params, job.dataset, job.float_model, job.calibrated,
                                    job.previous)
    layer = quant_layers(model)["conv1"]
    generator = layer_generator(cfg.seed, "conv1")
    with intra_op_threads(1), fake_quant_state(model, FakeQuantState.VALIDATION):
        layer.freeze_weight_qparams()
        x, y = capture_layer_io(model, reference, "conv1", 1, calibration_inputs(job.params, job.dataset))
        samples = LayerSamples.from_tensors(x, y, cfg.holdout_fraction, generator)
        report = reconstruct_layer("conv1", layer, samples, cfg, generator)
    assert torch.equal(disk_weight, layer.weight.detach())
    assert result.report["decision"] == report.decision
    assert result.digest == tensor_digest(disk_weight)


def test_adaround_layer_reuses_a_finished_result(params, inputs):
    job = _job(params, inputs, "conv1")
    first = adaround_layer.fn(job, cache_layer_activations.fn(job))
    stamp = Path(first.path).stat().st_mtime_ns
    again = adaround_layer.fn(job, None)  # a finished layer needs no cache at all
    assert again.reused and again.digest == first.digest and again.path == first.path
    assert Path(first.path).stat().st_mtime_ns == stamp


def test_layer_keys_follow_exactly_what_a_result_depends_on(params, inputs):
    base = _job(params, inputs, "conv2")

    def changed(section: str, **update) -> LayerJob:
        sub = getattr(params, section).model_copy(update=update)
        return dataclasses.replace(base, params=params.model_copy(update={section: sub}))

    steps = changed("adaround", num_steps=21)
    assert steps.result_key != base.result_key and steps.cache_key == base.cache_key
    for same in (changed("adaround", progress=True), changed("eval", batch_size=7),
                 changed("tracking", experiment="other"), changed("train", kwargs={"epochs": 9}),
                 changed("adaround", exclude_prefix=["fc"]), changed("adaround", num_batches=3)):
        assert (same.result_key, same.cache_key) == (base.result_key, base.cache_key)
    bits = changed("quant", weight_bits=3)
    assert bits.cache_key != base.cache_key and bits.result_key != base.result_key
    earlier = LayerResult("conv1", "x", "a" * 64, {})
    other = LayerResult("conv1", "x", "b" * 64, {})
    with_prev = dataclasses.replace(base, previous=(earlier,))
    assert with_prev.cache_key != base.cache_key
    assert dataclasses.replace(base, previous=(other,)).result_key != with_prev.result_key
    # the digest of an earlier result is of its weight, not of its file's bytes
    assert dataclasses.replace(base, previous=(dataclasses.replace(
        earlier, path="elsewhere", report={"seconds": 9.0}),)).result_key == with_prev.result_key


def test_tasks_pass_small_plain_values(params, inputs):
    job = _job(params, inputs, "conv1")
    values = [*inputs, plan_layers.fn(params, *inputs), cache_layer_activations.fn(job),
              adaround_layer.fn(job, cache_layer_activations.fn(job))]
    for value in values:
        assert isinstance(value, (Artifact, LayerPlan, LayerResult))
        fields = dataclasses.asdict(value)
        assert not any(isinstance(v, (torch.Tensor, torch.nn.Module)) for v in fields.values())
        assert len(pickle.dumps(value)) < 4096
    assert len(pickle.dumps(job)) < 16384  # params, paths and digests only


def test_assemble_and_evaluate(tmp_path, params, inputs, pipe):
    results, previous = [], []
    for name in pipe.layers:
        job = _job(params, inputs, name, previous)
        results.append(adaround_layer.fn(job, cache_layer_activations.fn(job)))
        previous = list(results)
    out = assemble_checkpoint.fn(params, *inputs, results, str(tmp_path / "a.safetensors"))
    state = load_tensors(out.file)
    for r in results:
        assert torch.equal(state[f"{r.name}.weight"], load_tensors(Path(r.path))["weight"])
    scores = evaluate_models.fn(params, *inputs, out)
    assert set(scores) == {"float", "baseline", "adaround"}
    assert all(set(s) == {"top1"} and 0.0 <= s["top1"] <= 100.0 for s in scores.values())
    assert scores["float"]["top1"] > 50.0  # the tiny model did learn the digits


def test_tensor_digest_is_of_content():
    a = torch.arange(6, dtype=torch.float32)
    assert tensor_digest(a) == tensor_digest(a.clone())
    assert tensor_digest(a) != tensor_digest(a.reshape(2, 3))
    assert tensor_digest(a) != tensor_digest(a.double())
    b = a.clone()
    b[3] += 1e-6
    assert tensor_digest(a) != tensor_digest(b)


def test_task_runner_comes_from_config(params):
    from prefect.task_runners import ThreadPoolTaskRunner

    assert isinstance(make_task_runner(params), ThreadPoolTaskRunner)
    dask = params.model_copy(update={"runtime": params.runtime.model_copy(
        update={"task_runner": "dask", "dask_address": None})})
    with pytest.raises(ValueError, match="dask_address"):
        make_task_runner(dask)


def test_io_tasks_retry(params):
    for io_task in (cache_layer_activations, prepare_data, assemble_checkpoint):
        assert io_task.retries >= 1


def test_missing_cache_dir_is_rebuilt(params, inputs):
    job = _job(params, inputs, "conv3")
    first = Path(cache_layer_activations.fn(job).path)
    shutil.rmtree(first)
    assert read_manifest(Path(cache_layer_activations.fn(job).path), verify=True)


def trainer_setting_weights(model, dataset, *, seed, value):
    """A ``train.trainer`` of this test: every parameter set to ``value``."""
    assert set(dataset) >= {"train_x", "train_y"} and seed == 0
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def trainer_returning_a_dict(model, dataset, *, seed):
    return {"weights": model.state_dict()}


def test_training_is_the_pluggable_trainer(tmp_path, params, inputs):
    dataset, _, _ = inputs
    train = params.train.model_copy(update={"trainer": "test_tasks:trainer_setting_weights",
                                            "kwargs": {"value": 0.25}})
    custom = params.model_copy(update={"train": train})
    out = train_float_model.fn(custom, dataset, str(tmp_path / "float.safetensors"))
    assert all(torch.all(t == 0.25) for k, t in load_tensors(out.file).items()
               if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))

    not_a_model = params.model_copy(update={"train": train.model_copy(
        update={"trainer": "test_tasks:trainer_returning_a_dict", "kwargs": {}})})
    with pytest.raises(ValueError, match=r"train.trainer 'test_tasks:trainer_returning_a_dict' "
                                        r"returned dict"):
        train_float_model.fn(not_a_model, dataset, str(tmp_path / "other.safetensors"))
    assert not (tmp_path / "other.safetensors").exists()


def test_export_and_onnx_runtime_evaluation(tmp_path, params, inputs, pipe):
    dataset, float_model, calibrated = inputs
    job = _job(params, inputs, "conv1")  # one rounded layer; the others export nearest
    first = adaround_layer.fn(job, cache_layer_activations.fn(job))
    rounded = assemble_checkpoint.fn(params, *inputs, [first],
                                     str(tmp_path / "rounded.safetensors"))
    local = params.model_copy(update={"runtime": params.runtime.model_copy(
        update={"checkpoint_dir": str(tmp_path / "checkpoints")})})
    onnx_file = export_model.fn(local, dataset, float_model, rounded)
    layout = Layout(local)
    onnx.checker.check_model(str(layout.onnx_model))
    assert json.loads(layout.encodings.read_text())["version"] == "0.6.1"
    assert set(load_tensors(layout.integer_weights)) >= {"conv1.weight.int", "conv1.weight.scale"}
    scores = evaluate_onnx.fn(local, dataset, float_model, rounded, onnx_file)
    activation_points = sum(k.endswith(".input.scale") for k in load_tensors(layout.integer_weights))
    torch_scores = evaluate_models.fn(local, dataset, float_model, calibrated, rounded)
    assert scores["reference_agreement"] == 1.0 and scores["reference_max_abs_diff"] < 1e-4
    assert scores["forced_points"] == activation_points and scores["forced_max_code_step"] <= 1
    assert abs(scores["top1"] - torch_scores["adaround"]["top1"]) <= \
        100 * (1 - scores["agreement"])

    graph = onnx.load(str(layout.onnx_model))  # a wrong weight in the file: the gate names it
    for init in graph.graph.initializer:
        if init.name == "conv1.weight":
            init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
    onnx.save(graph, str(layout.onnx_model))
    with pytest.raises(ParityError, match=r"at the input of layer 'conv2' .*nothing was "
                                          r"recorded"):
        evaluate_onnx.fn(local, dataset, float_model, rounded, onnx_file)


def test_agreement_is_argmax_for_logits_and_cosine_for_other_outputs():
    logits = np.array([[1.0, 0.0]] * 999 + [[0.0, 1.0]])
    flipped = logits.copy()
    flipped[[3, 7]] = [[0.0, 1.0]]
    scores, same = agreement([logits], [flipped], "argmax")
    assert scores == {"agreement": 0.998, "max_abs_diff": 1.0}
    assert list(np.flatnonzero(~same)) == [3, 7]
    rng = np.random.default_rng(0)
    expected = [rng.normal(size=(1000, 4, 8)).astype(np.float32)]
    close = [expected[0] + 1e-4]
    assert agreement(expected, close, "cosine")[0]["min_cosine"] > 0.999
    far = [expected[0].copy()]
    far[0][[5, 9]] = -far[0][[5, 9]]
    scores, same = agreement(expected, far, "cosine")
    assert scores["agreement"] == 0.998 and scores["min_cosine"] == pytest.approx(-1.0)
    assert list(np.flatnonzero(~same)) == [5, 9]


def test_layer_keys_carry_the_automatic_thread_choice(params, inputs, monkeypatch):
    from tasks import layer_jobs

    base = _job(params, inputs, "conv2")
    keys = base.result_key, base.cache_key
    monkeypatch.setattr(layer_jobs, "AVAILABLE_CPU_THREADS", layer_jobs.AVAILABLE_CPU_THREADS + 1)
    assert base.result_key != keys[0] and base.cache_key != keys[1]  # other cores, other sums
    explicit = params.adaround.model_copy(update={"num_threads": 1})
    pinned = dataclasses.replace(base, params=params.model_copy(update={"adaround": explicit}))
    pinned_keys = pinned.result_key, pinned.cache_key
    monkeypatch.setattr(layer_jobs, "AVAILABLE_CPU_THREADS", 64)
    assert (pinned.result_key, pinned.cache_key) == pinned_keys  # num_threads set: cores irrelevant


def test_capture_threads_follow_the_largest_layer(params, inputs, monkeypatch):
    """The plan sizes the capture tasks' threads by the largest layer call (one thread for
    the tiny test model, every core once a call reaches the threshold), and the cache task
    captures with them."""
    from adaround_core.reconstruction import threads
    from tasks import activation_cache

    assert plan_layers.fn(params, *inputs).capture_threads == 1
    monkeypatch.setattr(threads, "AVAILABLE_CPU_THREADS", 2)
    monkeypatch.setattr(threads, "PARALLEL_MIN_STEP_FLOPS", 1)
    plan = plan_layers.fn(params, *inputs)
    assert plan.capture_threads == 2
    seen = []
    capture = activation_cache._capture

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return capture(*args, **kwargs)

    monkeypatch.setattr(activation_cache, "_capture", spy)
    job = dataclasses.replace(_job(params, inputs, "conv1"), capture_threads=plan.capture_threads,
                              params=params.model_copy(update={"runtime": params.runtime.model_copy(
                                  update={"cache_dir": str(Path(params.runtime.cache_dir) / "t")})}))
    cache_layer_activations.fn(job)
    assert seen == [2]
