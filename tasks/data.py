"""Data preparation: ``data.source`` (module:function) -> one safetensors file."""

from __future__ import annotations

from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.artifacts import Artifact
from tasks.io import import_object, save_tensors
from tasks.params import PipelineParams
from tasks.run_logging import run_logger

REQUIRED_KEYS = ("train_x", "train_y", "calib_x", "test_x", "test_y")


def validate_dataset(dataset: object, source: str) -> dict[str, torch.Tensor]:
    """Check the data contract: a mapping with tensors under ``REQUIRED_KEYS``."""
    if not isinstance(dataset, dict):
        raise TypeError(f"data.source {source!r} returned {type(dataset).__name__}, "
                        f"not a dict of tensors")
    missing = [k for k in REQUIRED_KEYS if k not in dataset]
    if missing:
        raise ValueError(f"data.source {source!r} returned no {missing}; needed: {REQUIRED_KEYS}")
    for key, value in dataset.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"data.source {source!r}: {key!r} is {type(value).__name__}, "
                            f"not a tensor")
    return dataset


@task(retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def prepare_data(params: PipelineParams, out: str) -> Artifact:
    """Build the dataset with ``data.source`` and save it to ``out``."""
    source = params.data.source
    dataset = validate_dataset(import_object(source)(**params.data.kwargs), source)
    digest = save_tensors(Path(out), dataset)
    run_logger(__name__).info("dataset %s: %s", out,
                          {k: tuple(v.shape) for k, v in dataset.items()})
    return Artifact(out, digest)
