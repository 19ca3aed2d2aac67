"""Evaluation of the float, baseline-calibrated and AdaRound models."""

from __future__ import annotations

from tasks.artifacts import Artifact
from tasks.failures import pipeline_task
from tasks.io import import_object, load_tensors
from tasks.model_state import calibrated_model, compute_device, load_float_model
from tasks.params import PipelineParams
from tasks.run_logging import run_logger


@pipeline_task(retries=1)
def evaluate_models(params: PipelineParams, dataset: Artifact, float_model: Artifact,
                    calibrated: Artifact, rounded: Artifact) -> dict[str, float]:
    """``eval.metric`` of each model on the test split, and the AdaRound - baseline delta."""
    data = load_tensors(dataset.file)
    metric = import_object(params.eval.metric)
    device = compute_device(params)
    x, y = data["test_x"].to(device), data["test_y"].to(device)
    models = {"float": load_float_model(params, float_model.file),
              "baseline": calibrated_model(params, dataset, float_model, calibrated),
              "adaround": calibrated_model(params, dataset, float_model, rounded)}
    scores = {role: metric(model, x, y, batch_size=params.eval.batch_size)
              for role, model in models.items()}
    run_logger(__name__).info("top-1: %s", scores)
    return scores
