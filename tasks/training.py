"""The float model: trained by ``train.trainer`` on the dataset, or loaded from
``model.pretrained`` (training skipped)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tasks.artifacts import Artifact
from tasks.failures import pipeline_task
from tasks.io import import_object, load_tensors, save_tensors
from tasks.model_state import build_float_model
from tasks.params import PipelineParams
from tasks.run_logging import run_logger


def _pretrained_state(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        return load_tensors(Path(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def train(params: PipelineParams, model: nn.Module, dataset: dict[str, torch.Tensor]) -> nn.Module:
    """Call ``train.trainer(model, dataset, seed=runtime.seed, **train.kwargs)``."""
    trainer = params.train.trainer
    trained = import_object(trainer)(model, dataset, seed=params.runtime.seed,
                                     **params.train.kwargs)
    if not isinstance(trained, nn.Module):
        raise ValueError(f"train.trainer {trainer!r} returned {type(trained).__name__}, not the "
                        f"trained torch.nn.Module")
    return trained


@pipeline_task(retries=1)
def train_float_model(params: PipelineParams, dataset: Artifact, out: str) -> Artifact:
    """Save the float model's state_dict to ``out``."""
    torch.manual_seed(params.runtime.seed)
    model = build_float_model(params)
    if params.model.pretrained:
        model.load_state_dict(_pretrained_state(params.model.pretrained))
    else:
        model = train(params, model, load_tensors(dataset.file))
    digest = save_tensors(Path(out), model.state_dict())
    run_logger(__name__).info("float model saved to %s", out)
    return Artifact(out, digest)
