"""The data stage: check ``data.source`` and the model on it, then write the manifest.

Both kinds of source (``tasks/datasets.py``) are checked before anything is written, so a
bad source, model, checkpoint or metric fails with one line naming it and the previous
output stays as it was. The output is a directory: ``manifest.json`` (kind, sizes, sample
structure, SHA-256 of the calibration and evaluation samples) and, for a ``tensors``
source, ``tensors.safetensors``. A ``datasets`` source is not copied: the later stages
stream it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.artifacts import Artifact
from tasks.datasets import (
    TENSOR_KEYS,
    DataSourceError,
    RowDigest,
    batch_processor,
    call_source,
    check_splits,
    describe,
    first_line,
    head,
    loader,
    source_kind,
)
from tasks.failures import pipeline_task
from tasks.io import file_digest, save_tensors, write_json
from tasks.metrics import score
from tasks.model_state import initial_float_model
from tasks.params import PipelineParams
from tasks.run_logging import run_logger
from tasks.stage_data import TensorBatches

TENSORS_FILE = "tensors.safetensors"

REQUIRED_KEYS = TENSOR_KEYS
INPUT_KEYS = ("train_x", "calib_x", "test_x")
LABEL_KEYS = ("train_y", "test_y")
PAIRS = (("train_x", "train_y"), ("test_x", "test_y"))


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


def _run_model(model: nn.Module, batch: Any, what: str, params: PipelineParams) -> None:
    """``model`` (eval, no grad) on one model input; its error names ``what`` and the batch."""
    from adaround_core.calibration.batches import call_model

    try:
        with torch.no_grad():
            call_model(model, batch)
    except Exception as err:  # any model error means these inputs do not fit
        raise DataSourceError(params.data.source, f"model.factory {params.model.factory!r} "
                                                  f"cannot take {what}: {first_line(err)} (fix the data, "
                                                  f"data.batch_process, or model.factory / "
                                                  f"model.kwargs)") from None


def process_batch(process, batch: Any, where: str, params: PipelineParams) -> Any:
    """``data.batch_process`` of one batch; its failure names the batch."""
    try:
        return process(batch)
    except Exception as err:  # the user's code
        raise DataSourceError(params.data.source, f"data.batch_process "
                                                  f"{params.data.batch_process!r} failed on "
                                                  f"{where}: {type(err).__name__}: "
                                                  f"{first_line(err)}") from None


def check_model_accepts(params: PipelineParams, model: nn.Module,
                        dataset: dict[str, torch.Tensor]) -> None:
    """The float model runs on one calibration batch and on two test samples."""
    batches = {"calib_x": dataset["calib_x"][: params.calibration.batch_size],
               "test_x": dataset["test_x"][:2]}
    for key, batch in batches.items():
        _run_model(model, batch, f"{key} of shape {tuple(batch.shape)}", params)


def check_metric(params: PipelineParams, model: nn.Module, first_batch: Any) -> None:
    """``eval.metric`` returns named numbers on the first evaluation batch."""
    score(params, model, [first_batch], model)


def _tensors_manifest(params: PipelineParams, dataset: dict[str, torch.Tensor], model: nn.Module,
                      directory: Path) -> dict:
    validate_dataset(dataset, params.data.source)
    check_model_accepts(params, model, dataset)
    check_metric(params, model, next(iter(TensorBatches(dataset["test_x"], dataset["test_y"],
                                                        params.eval.batch_size))))
    digest = save_tensors(directory / TENSORS_FILE, dataset)
    return {"kind": "tensors", "source": params.data.source,
            "tensors": {"file": TENSORS_FILE, "sha256": digest,
                        "shapes": {k: list(v.shape) for k, v in dataset.items()}}}


def _split_summary(params: PipelineParams, batches, split: str, model: nn.Module) -> dict:
    """Stream ``batches``: the first through the model (and the metric), all hashed and
    checked for NaN/Inf."""
    from adaround_core.calibration.batches import check_finite

    digest, process, structure = RowDigest(), batch_processor(params), None
    count = 0
    for i, batch in enumerate(batches):
        count += 1
        if structure is None:
            structure = describe(batch)
            inputs = process_batch(process, batch, f"{split} batch {i}", params)
            _run_model(model, inputs, f"{split} batch {i} ({describe(inputs)})", params)
            if split == "evaluation":
                check_metric(params, model, batch)
        try:
            check_finite(batch, i)
            digest.update(batch)
        except ValueError as err:
            raise DataSourceError(params.data.source, f"{split}: {first_line(err)}") from None
    if structure is None:
        raise DataSourceError(params.data.source, f"{split} yielded no batch")
    return {"samples": digest.samples, "batches": count, "sample": structure,
            "sha256": digest.hexdigest()}


def _datasets_manifest(params: PipelineParams, splits: dict, model: nn.Module) -> dict:
    source, cfg = params.data.source, params.calibration
    check_splits(splits, source)
    calibration = head(loader(splits["calibration"], cfg.batch_size), cfg.num_samples)
    manifest = {"kind": "datasets", "source": source,
                "batch_process": params.data.batch_process,  # shapes the model's inputs
                "calibration": _split_summary(params, calibration, "calibration", model),
                "evaluation": _split_summary(params, loader(splits["evaluation"],
                                                            params.eval.batch_size),
                                             "evaluation", model)}
    if "train" in splits and hasattr(splits["train"], "__len__"):
        manifest["train"] = {"samples": len(splits["train"])}
    return manifest


@pipeline_task(retries=2, retry_delay_seconds=1)  # a DataSourceError is not retried
def prepare_data(params: PipelineParams, out: str) -> Artifact:
    """Check ``data.source`` with the float model (and ``model.pretrained``, and
    ``eval.metric`` on one batch), then write the manifest ``out`` (and, for tensors, the
    tensors beside it)."""
    result = call_source(params)
    kind = source_kind(result, params.data.source)
    model = initial_float_model(params).eval()
    directory = Path(out).parent
    if kind == "tensors":
        manifest = _tensors_manifest(params, result, model, directory)
    else:
        manifest = _datasets_manifest(params, result, model)
    write_json(Path(out), manifest)
    if kind == "datasets":
        (directory / TENSORS_FILE).unlink(missing_ok=True)  # from an earlier tensors source
    run_logger(__name__).info("dataset %s: %s", out, manifest)
    return Artifact(out, file_digest(Path(out)))
