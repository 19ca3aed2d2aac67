"""Data preparation: ``data.source`` (module:function) -> one safetensors file.

The source's result is checked before anything is written, so a bad source fails with one
:class:`DataSourceError` naming the source and the tensor, and the previous dataset file
stays as it was.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tasks.artifacts import Artifact
from tasks.failures import pipeline_task
from tasks.io import import_object, save_tensors
from tasks.model_state import build_float_model
from tasks.params import PipelineParams
from tasks.run_logging import run_logger

REQUIRED_KEYS = ("train_x", "train_y", "calib_x", "test_x", "test_y")
INPUT_KEYS = ("train_x", "calib_x", "test_x")
LABEL_KEYS = ("train_y", "test_y")
PAIRS = (("train_x", "train_y"), ("test_x", "test_y"))


class DataSourceError(ValueError):
    """A ``data.source`` result that breaks the data contract."""

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"data.source {source!r}: {problem}")


def check_is_dict(dataset: object, source: str) -> None:
    """The source returned a dict."""
    if not isinstance(dataset, dict):
        raise DataSourceError(source, f"returned {type(dataset).__name__}, not a dict of "
                                      f"tensors; return {{{', '.join(REQUIRED_KEYS)}}}")


def check_required_keys(dataset: dict, source: str) -> None:
    """Every key of ``REQUIRED_KEYS`` is present."""
    missing = [k for k in REQUIRED_KEYS if k not in dataset]
    if missing:
        raise DataSourceError(source, f"returned no {', '.join(missing)}; the dict needs all "
                                      f"of {', '.join(REQUIRED_KEYS)}")


def check_all_tensors(dataset: dict, source: str) -> None:
    """Every value is a ``torch.Tensor``."""
    for key, value in dataset.items():
        if not isinstance(value, torch.Tensor):
            raise DataSourceError(source, f"{key} is {type(value).__name__}, not a tensor; "
                                          f"convert it with torch.as_tensor")


def check_not_empty(dataset: dict, source: str) -> None:
    """Every required tensor has at least one sample along dim 0."""
    for key in REQUIRED_KEYS:
        if dataset[key].dim() == 0 or len(dataset[key]) == 0:
            raise DataSourceError(source, f"{key} is empty (shape {tuple(dataset[key].shape)}); "
                                          f"it needs at least one sample along dim 0")


def check_pair_lengths(dataset: dict, source: str) -> None:
    """Images and labels pair up: ``train_x``/``train_y`` and ``test_x``/``test_y``."""
    for x_key, y_key in PAIRS:
        x_len, y_len = len(dataset[x_key]), len(dataset[y_key])
        if x_len != y_len:
            raise DataSourceError(source, f"{x_key} has {x_len} samples but {y_key} has "
                                          f"{y_len}; give one label per sample")


def check_input_dtypes(dataset: dict, source: str) -> None:
    """The inputs (``*_x``) are floating point."""
    for key in INPUT_KEYS:
        if not dataset[key].dtype.is_floating_point:
            raise DataSourceError(source, f"{key} is {dataset[key].dtype}; inputs must be "
                                          f"floating point (e.g. {key}.float())")


def check_labels(dataset: dict, source: str) -> None:
    """The labels (``*_y``) are 1-D integer class indices."""
    for key in LABEL_KEYS:
        y = dataset[key]
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise DataSourceError(source, f"{key} is {y.dtype}; labels must be integer "
                                          f"class indices (e.g. {key}.long())")
        if y.dim() != 1:
            raise DataSourceError(source, f"{key} has shape {tuple(y.shape)}; labels must be "
                                          f"1-D, one class index per sample")


def check_sample_shapes(dataset: dict, source: str) -> None:
    """``calib_x`` and ``test_x`` samples have the shape of ``train_x`` samples."""
    expected = tuple(dataset["train_x"].shape[1:])
    for key in ("calib_x", "test_x"):
        shape = tuple(dataset[key].shape[1:])
        if shape != expected:
            raise DataSourceError(source, f"{key} samples have shape {shape} but train_x "
                                          f"samples have {expected}; calib_x, train_x and "
                                          f"test_x need one sample shape")


def check_finite(dataset: dict, source: str) -> None:
    """The inputs hold no NaN or Inf."""
    for key in INPUT_KEYS:
        bad = ~torch.isfinite(dataset[key])
        if bad.any():
            first = int(bad.reshape(len(bad), -1).any(1).nonzero()[0])
            raise DataSourceError(source, f"{key} has {int(bad.sum())} NaN/Inf values (first "
                                          f"in sample {first}); remove or replace them")


CONTRACT_CHECKS = (check_required_keys, check_all_tensors, check_not_empty, check_pair_lengths,
                   check_input_dtypes, check_labels, check_sample_shapes, check_finite)


def validate_dataset(dataset: object, source: str) -> dict[str, torch.Tensor]:
    """Check the data contract (``CONTRACT_CHECKS``); return ``dataset``."""
    check_is_dict(dataset, source)
    for check in CONTRACT_CHECKS:
        check(dataset, source)
    return dataset


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def check_model_accepts(params: PipelineParams, dataset: dict[str, torch.Tensor],
                        source: str) -> None:
    """A fresh float model (``model.factory``, eval, no grad) runs on one calibration
    batch and on two test samples."""
    model = build_float_model(params).eval()
    batches = {"calib_x": dataset["calib_x"][: params.calibration.batch_size],
               "test_x": dataset["test_x"][:2]}
    for key, batch in batches.items():
        try:
            with torch.no_grad():
                model(batch)
        except Exception as err:  # any model error means these inputs do not fit
            raise DataSourceError(source, f"model.factory {params.model.factory!r} cannot "
                                          f"take {key} of shape {tuple(batch.shape)}: "
                                          f"{_first_line(err)} (fix the data, or model.factory "
                                          f"/ model.kwargs)") from None


@pipeline_task(retries=2, retry_delay_seconds=1)  # a DataSourceError is not retried
def prepare_data(params: PipelineParams, out: str) -> Artifact:
    """Build the dataset with ``data.source``, check it, and save it to ``out``."""
    source = params.data.source
    dataset = validate_dataset(import_object(source)(**params.data.kwargs), source)
    check_model_accepts(params, dataset, source)
    digest = save_tensors(Path(out), dataset)
    run_logger(__name__).info("dataset %s: %s", out,
                              {k: tuple(v.shape) for k, v in dataset.items()})
    return Artifact(out, digest)
