"""The tiny pipeline end to end, in-process, under Prefect's test harness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flows.pipeline import pipeline_flow
from tasks.io import load_tensors, read_json
from tasks.layout import Layout


@pytest.fixture(scope="module")
def run(prefect_harness, tmp_path_factory, pipe):
    """One whole pipeline run (data -> evaluate) in a fresh tiny project."""
    project = pipe.project(tmp_path_factory.mktemp("e2e"))
    params = pipe.params(project)
    state = pipeline_flow(params, return_state=True)
    return params, state


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _artifact(key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with _client() as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.CREATED_DESC)
    assert found, f"no artifact {key!r}"
    return found[0]


def test_pipeline_completes_and_writes_every_output(run, pipe):
    params, state = run
    assert state.is_completed(), state
    metrics = state.result()
    layout = Layout(params)
    assert read_json(layout.metrics) == metrics
    assert metrics["float"]["top1"] > 50.0
    assert metrics["delta_top1"] == pytest.approx(metrics["adaround"]["top1"]
                                                  - metrics["baseline"]["top1"])
    report = read_json(layout.layer_report)
    assert [row["layer"] for row in report] == pipe.layers
    assert all(row["decision"] in ("adaround", "nearest(layer)") for row in report)
    assert all(row["capture_seconds"] > 0 and row["seconds"] > 0 for row in report)
    assert layout.layer_plot.read_text().splitlines()[0] == \
        "index,layer,nearest_mse,adaround_mse,decision"
    assert len(pipe.result_files(Path(params.runtime.results_dir).parent)) == len(pipe.layers)


def test_pipeline_weights_equal_the_library_call(run, pipe):
    """The pipeline (per-layer tasks, disk caches) and the bare in-memory
    ``weight_reconstruction`` give the same checkpoint, bit for bit."""
    params, _ = run
    pipeline_state = load_tensors(Layout(params).adaround_checkpoint)
    library_state = pipe.library_state(params)
    assert set(pipeline_state) == set(library_state)
    differ = [k for k in library_state if not torch.equal(pipeline_state[k], library_state[k])]
    assert not differ, f"pipeline and library differ in {differ}"
    calibrated = load_tensors(Layout(params).calibrated_checkpoint)
    assert any(not torch.equal(calibrated[f"{n}.weight"], pipeline_state[f"{n}.weight"])
               for n in pipe.layers), "AdaRound changed no weight at all"


def test_per_layer_table_and_progress_artifacts(run, pipe):
    table = _artifact("adaround-layer-report")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["layer"] for r in rows] == pipe.layers
    assert {"nearest_mse", "adaround_mse", "decision", "reused"} <= set(rows[0])
    progress = _artifact("adaround-layers")
    assert float(progress.data) == pytest.approx(100.0)


def test_one_task_run_per_layer_and_stage_logs_reach_prefect(run, pipe):
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # logs are shipped in batches
    adaround_run_id = _artifact("adaround-layer-report").flow_run_id
    with _client() as client:
        flow_run = client.read_flow_run(adaround_run_id)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[adaround_run_id])))
        logs = client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[adaround_run_id])))
    assert flow_run.state.is_completed()
    names = [t.name.rsplit("-", 1)[0] for t in task_runs]
    assert names.count("cache_layer_activations") == len(pipe.layers)
    assert names.count("adaround_layer") == len(pipe.layers)
    assert {"plan_layers", "assemble_checkpoint"} <= set(names)
    assert all(t.state.is_completed() for t in task_runs)
    text = "\n".join(log.message for log in logs)
    assert "5 layers rounded, 0 reused" in text
    assert "conv1: cached 64 samples" in text  # a task's log, through the run logger


def test_second_run_reuses_every_layer(run, pipe):
    params, _ = run
    layout = Layout(params)
    before = layout.adaround_checkpoint.read_bytes()
    stamps = {p: p.stat().st_mtime_ns
              for p in (Path(params.runtime.results_dir) / "layers").iterdir()}
    state = pipeline_flow(params, return_state=True)
    assert state.is_completed()
    assert layout.adaround_checkpoint.read_bytes() == before
    assert {p: p.stat().st_mtime_ns
            for p in (Path(params.runtime.results_dir) / "layers").iterdir()} == stamps
    rows = _artifact("adaround-layer-report").data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert all(r["reused"] for r in rows)
    assert all(row["capture_seconds"] == 0 for row in read_json(layout.layer_report))
