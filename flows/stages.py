"""One Prefect flow per pipeline stage; each reads its inputs from the stage before.

Flows only compose tasks: the math is in ``adaround_core``, the work in ``tasks``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from tqdm.auto import tqdm

from flows.runtime import output_lock
from tasks.activation_cache import (
    cache_layer_activations,
    remove_layer_cache,
    remove_used_frontiers,
)
from tasks.artifacts import Artifact, LayerPlan, LayerResult
from tasks.cache_removal import finish_removals
from tasks.calibration import calibrate
from tasks.data import prepare_data
from tasks.disk_budget import check_cache_space
from tasks.evaluation import evaluate_models
from tasks.export import export_model
from tasks.layer_adaround import adaround_layer, assemble_checkpoint
from tasks.layer_jobs import LayerJob, plan_job
from tasks.layer_results import finished_result, remove_partial_results
from tasks.layout import Layout, existing
from tasks.onnx_evaluation import evaluate_onnx
from tasks.params import PipelineParams
from tasks.planning import plan_layers
from tasks.preflight import preflight
from tasks.reporting import write_layer_outputs, write_metrics
from tasks.training import train_float_model


@contextlib.contextmanager
def stage(params: PipelineParams, name: str) -> Iterator[Layout]:
    """The frame of every stage: its preflight (before anything is touched), then the lock
    on the output dirs; yields where the outputs live."""
    preflight(params, name)
    with output_lock(params):
        yield Layout(params)


@flow(persist_result=False, name="data")
def data_flow(params: PipelineParams) -> Artifact:
    """Build the dataset file."""
    with stage(params, "data") as layout:
        return prepare_data(params, str(layout.dataset))


@flow(persist_result=False, name="train")
def train_flow(params: PipelineParams) -> Artifact:
    """Train (or load) the float model."""
    with stage(params, "train") as layout:
        dataset = existing(layout.dataset, "data")
        return train_float_model(params, dataset, str(layout.float_checkpoint))


@flow(persist_result=False, name="calibrate")
def calibrate_flow(params: PipelineParams) -> Artifact:
    """Baseline calibration (nearest rounding)."""
    with stage(params, "calibrate") as layout:
        return calibrate(params, existing(layout.dataset, "data"),
                         existing(layout.float_checkpoint, "train"),
                         str(layout.calibrated_checkpoint))


def _round_layers(params: PipelineParams, dataset: Artifact, float_model: Artifact,
                  calibrated: Artifact,
                  ) -> tuple[LayerPlan, list[LayerResult], dict[str, float]]:
    """Round the plan's units in order (finished ones reused); the plan, the results and
    each rounded unit's capture time (its activation cache task), by name."""
    plan = plan_layers(params, dataset, float_model, calibrated)
    check_cache_space(params, plan.cache_bytes)  # before any layer is touched
    remove_partial_results(params)
    finish_removals(Path(params.runtime.cache_dir))  # what a killed run left in the trash
    progress_id = create_progress_artifact(0.0, key="adaround-layers",
                                           description="layers rounded")
    results: list[LayerResult] = []
    capture_seconds: dict[str, float] = {}
    job: LayerJob | None = None
    for i, _ in enumerate(tqdm(plan.names, desc="AdaRound layers", unit="layer")):
        job = plan_job(params, dataset, float_model, calibrated, plan, results, upstream=job)
        result = finished_result(job)  # resuming: no task, no activation cache needed
        if result is None:
            start = time.perf_counter()
            cache = cache_layer_activations(job)
            capture_seconds[job.name] = time.perf_counter() - start
            if not params.runtime.keep_cache:
                remove_used_frontiers(job)  # its cache continued them: no one else will
            result = adaround_layer(job, cache)
            if not params.runtime.keep_cache:
                remove_layer_cache(job)  # resume needs only the finished result
        elif not params.runtime.keep_cache:
            remove_used_frontiers(job)  # left by a killed run; nothing continues them now
        results.append(result)
        update_progress_artifact(progress_id, 100.0 * (i + 1) / len(plan.names))
    finish_removals(Path(params.runtime.cache_dir))
    return plan, results, capture_seconds


@flow(persist_result=False, name="adaround")
def adaround_flow(params: PipelineParams) -> Artifact:
    """Round every layer (resuming finished ones), then assemble the rounded checkpoint."""
    with stage(params, "adaround") as layout:
        dataset = existing(layout.dataset, "data")
        float_model = existing(layout.float_checkpoint, "train")
        calibrated = existing(layout.calibrated_checkpoint, "calibrate")
        plan, results, capture_seconds = _round_layers(params, dataset, float_model, calibrated)
        reused = sum(r.reused for r in results)
        get_run_logger().info("%d layers rounded, %d reused from earlier runs; capture %.1f s, "
                              "rounding %.1f s", len(results) - reused, reused,
                              sum(capture_seconds.values()),
                              sum(r.report["seconds"] for r in results if not r.reused))
        capture = {"capture_method": plan.capture_method, "capture_note": plan.capture_note}
        write_layer_outputs(layout, results, capture, plan.cache_bytes, capture_seconds)
        create_table_artifact([{"layer": r.name, **r.report, "reused": r.reused, **capture}
                               for r in results], key="adaround-layer-report")
        return assemble_checkpoint(params, dataset, float_model, calibrated, results,
                                   str(layout.adaround_checkpoint))


@flow(persist_result=False, name="export")
def export_flow(params: PipelineParams) -> Artifact:
    """The AdaRound model as ONNX QDQ, encodings and integer weights."""
    with stage(params, "export") as layout:
        return export_model(params, existing(layout.dataset, "data"),
                            existing(layout.float_checkpoint, "train"),
                            existing(layout.adaround_checkpoint, "adaround"))


@flow(persist_result=False, name="evaluate")
def evaluate_flow(params: PipelineParams) -> dict[str, float]:
    """Score float / baseline / AdaRound and the exported model in ONNX Runtime, write the
    metrics file, record the run in MLflow."""
    with stage(params, "evaluate") as layout:
        dataset = existing(layout.dataset, "data")
        float_model = existing(layout.float_checkpoint, "train")
        rounded = existing(layout.adaround_checkpoint, "adaround")
        scores = evaluate_models(params, dataset, float_model,
                                 existing(layout.calibrated_checkpoint, "calibrate"), rounded)
        onnx = evaluate_onnx(params, dataset, float_model, rounded,
                             existing(layout.onnx_model, "export"))
        metrics = write_metrics(layout, scores, onnx)
        if params.tracking.enabled:
            from tasks.tracking import record_pipeline_run  # imported late: mlflow takes ~1 s

            recorded = record_pipeline_run(params, layout, metrics)
            if recorded.registered:  # the registry's decision, for the run's output
                metrics = {**metrics, "registry": recorded.registered.line()}
        return metrics

