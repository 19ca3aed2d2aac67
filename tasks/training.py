"""The float model: trained by ``train.trainer`` on the dataset, loaded from
``model.pretrained`` (training skipped), or the factory's own weights (``train.trainer``
null)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.artifacts import Artifact
from tasks.failures import pipeline_task
from tasks.io import import_object, save_tensors
from tasks.model_state import initial_float_model
from tasks.params import PipelineParams
from tasks.run_logging import run_logger
from tasks.stage_data import open_data


def train(params: PipelineParams, model: nn.Module, dataset: Any) -> nn.Module:
    """Call ``train.trainer(model, dataset, seed=runtime.seed, **train.kwargs)``; ``dataset``
    is the tensors of a digits-style source, else the source's dict of splits."""
    trainer = params.train.trainer
    trained = import_object(trainer)(model, dataset, seed=params.runtime.seed,
                                     **params.train.kwargs)
    if not isinstance(trained, nn.Module):
        raise ValueError(f"train.trainer {trainer!r} returned {type(trained).__name__}, not the "
                         f"trained torch.nn.Module")
    return trained


def will_train(params: PipelineParams) -> bool:
    """Training runs only with a trainer and no ``model.pretrained``."""
    return bool(params.train.trainer) and not params.model.pretrained


@pipeline_task(retries=1)
def train_float_model(params: PipelineParams, dataset: Artifact, out: str) -> Artifact:
    """Save the float model's state_dict to ``out``."""
    torch.manual_seed(params.runtime.seed)
    model = initial_float_model(params)
    if will_train(params):
        model = train(params, model, open_data(params, dataset).training())
    digest = save_tensors(Path(out), model.state_dict())
    run_logger(__name__).info("float model saved to %s", out)
    return Artifact(out, digest)
