"""``adaround.guard: output`` in the pipeline: the layer tasks hold out the engine's batches,
judge each layer on the model's output, and the report records the decisions."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from tasks.activation_cache import cache_layer_activations
from tasks.guard_batches import training_inputs
from tasks.io import read_json
from tasks.layer_adaround import adaround_layer, assemble_checkpoint
from tasks.layer_jobs import LayerJob
from tasks.layout import Layout, existing
from tasks.model_state import calibration_inputs
from tasks.reporting import write_layer_outputs

DECISIONS = {"adaround", "nearest(output)"}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_checkpoints, pipe) -> Path:
    return pipe.project(tmp_path_factory.mktemp("guard"), tiny_checkpoints,
                        {"adaround": {"num_steps": 20, "progress": False, "guard": "output",
                                      "guard_batches": 1}})


@pytest.fixture(scope="module")
def rounded(project, pipe):
    """Every layer rounded by the task bodies, the report and the checkpoint written."""
    params = pipe.params(project)
    layout = Layout(params)
    inputs = (existing(layout.dataset, "data"), existing(layout.float_checkpoint, "train"),
              existing(layout.calibrated_checkpoint, "calibrate"))
    results = []
    for name in pipe.layers:
        job = LayerJob(params, *inputs, name, 1, tuple(results))
        results.append(adaround_layer.fn(job, cache_layer_activations.fn(job)))
    write_layer_outputs(layout, results)
    assemble_checkpoint.fn(params, *inputs, results, str(layout.adaround_checkpoint))
    return params, layout, inputs


def test_the_report_records_each_decision_and_the_output_errors(rounded, pipe):
    _, layout, _ = rounded
    rows = read_json(layout.layer_report)
    assert [row["layer"] for row in rows] == pipe.layers
    for row in rows:
        assert row["decision"] in DECISIONS, row
        worse = row["adaround_output_mse"] > row["nearest_output_mse"]
        assert (row["decision"] == "nearest(output)") == worse, row
    with open(layout.layer_plot, newline="") as f:  # the plot's table has them too
        table = list(csv.DictReader(f))
    assert [r["layer"] for r in table] == pipe.layers
    for row, line in zip(rows, table, strict=True):
        assert float(line["nearest_output_mse"]) == row["nearest_output_mse"]
        assert float(line["adaround_output_mse"]) == row["adaround_output_mse"]


def test_the_pipeline_rounds_as_the_library_does(rounded, pipe):
    params, layout, _ = rounded
    differ = pipe.differs_from_library(params, layout)
    assert not differ, f"pipeline and library differ in {differ}"


def test_layers_are_cached_without_the_held_out_batch(rounded):
    params, _, inputs = rounded
    every = calibration_inputs(params, inputs[0])
    assert len(training_inputs(params, inputs[0])) == len(every) - 1
    layer = params.adaround.model_copy(update={"guard": "layer"})
    assert len(training_inputs(params.model_copy(update={"adaround": layer}),
                               inputs[0])) == len(every)


def test_the_held_out_batches_are_part_of_the_cache_key(rounded, pipe):
    params, _, inputs = rounded
    job = LayerJob(params, *inputs, pipe.layers[0], 1, ())

    def key(**update) -> str:
        cfg = params.adaround.model_copy(update=update)
        return dataclasses.replace(job, params=params.model_copy(update={"adaround": cfg})
                                   ).cache_key

    assert key(guard_batches=2) != job.cache_key and key(seed=1) != job.cache_key
    assert key(guard="layer") == key(guard="off") != job.cache_key
    assert key(guard="layer", guard_batches=3) == key(guard="layer")  # no batch held out


def test_an_override_selects_the_output_guard(tiny_project):
    from tasks.params import load_params

    params = load_params(tiny_project / "params.yaml", ["adaround.guard=output"])
    assert params.adaround.guard == "output"
    assert load_params(tiny_project / "params.yaml", ["adaround.guard=false"]).adaround.guard \
        == "off"
    with pytest.raises(ValueError, match="adaround.guard"):
        load_params(tiny_project / "params.yaml", ["adaround.guard=model"])


def test_mlflow_records_the_decisions_and_output_errors_per_layer(tmp_path, fake_results):
    from mlflow import MlflowClient

    from tasks.io import write_json
    from tasks.tracking import _log_layers, tracking_uri

    params, layout, _ = fake_results(tmp_path)
    rows = read_json(layout.layer_report)
    for i, row in enumerate(rows):
        row.update(nearest_output_mse=1.0 / (i + 1), adaround_output_mse=2.0 / (i + 1),
                   decision="nearest(output)")
    write_json(layout.layer_report, rows)
    client = MlflowClient(tracking_uri(params))
    run_id = client.create_run(client.create_experiment("guard")).info.run_id
    _log_layers(client, run_id, layout)
    for key, top in (("nearest_output_mse", 1.0), ("adaround_output_mse", 2.0)):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.value for m in history] == pytest.approx([top, top / 2, top / 3])
    table = json.loads(Path(client.download_artifacts(run_id, "layer_errors.json",
                                                      str(tmp_path))).read_text())
    decisions = table["data"][0][table["columns"].index("decision")]
    assert decisions == "nearest(output)"
