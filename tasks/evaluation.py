"""Evaluation of the float, baseline-calibrated and AdaRound models with ``eval.metric``."""

from __future__ import annotations

from tasks.artifacts import Artifact
from tasks.failures import pipeline_task
from tasks.metrics import score
from tasks.model_state import calibrated_model, compute_device, load_float_model
from tasks.params import PipelineParams
from tasks.run_logging import run_logger
from tasks.stage_data import open_data


@pipeline_task(retries=1)
def evaluate_models(params: PipelineParams, dataset: Artifact, float_model: Artifact,
                    calibrated: Artifact, rounded: Artifact) -> dict[str, dict[str, float]]:
    """``eval.metric``'s named numbers of each model on the evaluation data, by role."""
    device = compute_device(params)
    batches = open_data(params, dataset).evaluation(device)
    reference = load_float_model(params, float_model.file)
    models = {"float": reference,
              "baseline": calibrated_model(params, dataset, float_model, calibrated),
              "adaround": calibrated_model(params, dataset, float_model, rounded)}
    scores = {role: score(params, model, batches, reference) for role, model in models.items()}
    run_logger(__name__).info("metrics: %s", scores)
    return scores
