"""The float model: trained on the dataset (demo) or loaded from ``model.pretrained``."""

from __future__ import annotations

from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from adaround_core.demo.training import train_classifier
from tasks.artifacts import Artifact
from tasks.io import load_tensors, save_tensors
from tasks.model_state import build_float_model
from tasks.params import PipelineParams
from tasks.run_logging import run_logger


def _pretrained_state(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        return load_tensors(Path(path))
    return torch.load(path, map_location="cpu", weights_only=True)


@task(retries=1, cache_policy=NO_CACHE)
def train_float_model(params: PipelineParams, dataset: Artifact, out: str) -> Artifact:
    """Save the float model's state_dict to ``out``."""
    torch.manual_seed(params.runtime.seed)
    model = build_float_model(params)
    if params.model.pretrained:
        model.load_state_dict(_pretrained_state(params.model.pretrained))
    else:
        data = load_tensors(dataset.file)
        t = params.train
        train_classifier(model, data["train_x"], data["train_y"], epochs=t.epochs,
                         batch_size=t.batch_size, lr=t.lr, seed=params.runtime.seed)
    digest = save_tensors(Path(out), model.state_dict())
    run_logger(__name__).info("float model saved to %s", out)
    return Artifact(out, digest)
