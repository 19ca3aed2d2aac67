"""``drop_prob`` / ``activation_lr`` in the pipeline: each layer's task takes the engine's
autograd unit path on inputs cached before their fake-quant, its result file holds the
learned input scale, and later layers, the checkpoint and a rerun use it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from adaround_core.quant.quant_layers import quant_layers
from tasks.input_qparams import INPUT_SCALE
from tasks.io import load_tensors, tensor_digest
from tasks.layer_adaround import assemble_checkpoint
from tasks.layer_jobs import plan_job
from tasks.layout import Layout, existing
from tasks.model_state import calibrated_model
from tasks.planning import plan_layers

VARIANT = {"num_steps": 20, "progress": False, "drop_prob": 0.5, "activation_lr": 1e-3}


@pytest.fixture(scope="module")
def rounded(tmp_path_factory, tiny_checkpoints, pipe):
    project = pipe.project(tmp_path_factory.mktemp("qdrop"), tiny_checkpoints,
                           {"adaround": VARIANT})
    params = pipe.params(project)
    layout = Layout(params)
    inputs = (existing(layout.dataset, "data"), existing(layout.float_checkpoint, "train"),
              existing(layout.calibrated_checkpoint, "calibrate"))
    results = pipe.round_units(params, inputs)
    assemble_checkpoint.fn(params, *inputs, results, str(layout.adaround_checkpoint))
    return params, layout, inputs, results


def test_the_pipeline_trains_activations_as_the_library_does(rounded, pipe):
    params, layout, _, results = rounded
    differ = pipe.differs_from_library(params, layout)
    assert not differ, f"pipeline and library differ in {differ}"
    pipeline_state = load_tensors(layout.adaround_checkpoint)
    calibrated = load_tensors(layout.calibrated_checkpoint)
    learned = [k for k in calibrated if k.endswith("scale")
               and not torch.equal(calibrated[k], pipeline_state[k])
               and ".weight_fake_quant" not in k]
    assert learned, "no activation scale was learned"


def test_rebuilt_models_use_the_learned_input_scales_of_the_result_files(rounded):
    params, _, inputs, results = rounded
    stored = {r.name: load_tensors(Path(r.path)) for r in results}
    learned = [name for name, tensors in stored.items() if INPUT_SCALE in tensors]
    assert learned, "no result file holds a learned input scale"
    layers = quant_layers(calibrated_model(params, *inputs, results))
    for name in learned:
        quantizer = layers[name].input_fake_quant
        assert torch.equal(quantizer.scale, stored[name][INPUT_SCALE]) and bool(quantizer.frozen)


def test_a_rerun_reuses_every_layer(rounded, pipe):
    params, _, inputs, results = rounded
    again = pipe.round_units(params, inputs)
    assert all(r.reused for r in again)
    assert [r.digest for r in again] == [r.digest for r in results]


def test_trained_activations_change_the_cache_key_and_defaults_do_not(rounded, pipe):
    params, _, inputs, _ = rounded
    default = params.adaround.model_copy(update={"drop_prob": 0.0, "activation_lr": None})
    job = dataclasses.replace(plan_job(params, *inputs, plan_layers.fn(params, *inputs), []),
                              params=params.model_copy(update={"adaround": default}))

    def key(**update) -> str:
        cfg = default.model_copy(update=update)
        return dataclasses.replace(job, params=params.model_copy(update={"adaround": cfg})
                                   ).cache_key

    assert job.cache_key == job._digest()  # plain AdaRound: the key it always had
    assert key(drop_prob=0.5) == key(activation_lr=1e-3) != job.cache_key
    assert key(num_steps=3) == job.cache_key


def test_plain_adaround_results_hold_only_the_weight(tmp_path, tiny_checkpoints, pipe):
    """So their digests, and every later layer's keys, stay those of earlier versions."""
    params = pipe.params(pipe.project(tmp_path, tiny_checkpoints))
    layout = Layout(params)
    inputs = (existing(layout.dataset, "data"), existing(layout.float_checkpoint, "train"),
              existing(layout.calibrated_checkpoint, "calibrate"))
    for result in pipe.round_units(params, inputs):
        assert set(load_tensors(Path(result.path))) == {"weight"}, result.name
        assert result.digest == tensor_digest(load_tensors(Path(result.path))["weight"])
