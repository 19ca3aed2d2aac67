"""Finished layer results on disk: written with their key and the SHA-256 of the rounded
weight (and learned input qparams), verified on every reuse; an invalid file is reported by
name and recomputed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open

from tasks.artifacts import LayerResult
from tasks.io import save_tensors, tensor_digest
from tasks.layer_jobs import KEY_CHARS_IN_NAMES, LayerJob
from tasks.params import PipelineParams
from tasks.run_logging import run_logger

WEIGHT_DIGEST = "weight_sha256"  # metadata entry: result_digest of the result's tensors
WORLD_SIZE = "world_size"  # metadata entry of a torchrun run's result: its number of ranks
RESULT_METADATA = ("key", "report", WEIGHT_DIGEST)
T = TypeVar("T")


class InvalidResultError(ValueError):
    """A layer result file that cannot be trusted; the message says why."""


def result_digest(tensors: dict[str, torch.Tensor]) -> str:
    """What keys later layers: the rounded weight's :func:`tensor_digest` (plain AdaRound),
    with learned input qparams the SHA-256 of every tensor's digest by name."""
    if set(tensors) == {"weight"}:  # plain AdaRound of one layer: the key it always had
        return tensor_digest(tensors["weight"])
    digests = {name: tensor_digest(t) for name, t in tensors.items()}
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def _read_safetensors(path: Path, read: Callable[[Any], T]) -> T:
    """``read`` of ``path`` opened by safetensors; any error opening or reading it is the
    result's invalidity (safetensors raises its own types for bad headers and data), so
    ``read`` must do nothing but read the opened file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return read(f)
    except Exception as err:
        raise InvalidResultError(f"unreadable: {err}") from err


def _open_result(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a result file."""
    metadata, tensors = _read_safetensors(
        path, lambda f: (f.metadata() or {}, {name: f.get_tensor(name) for name in f.keys()}))  # noqa: SIM118
    if not tensors:
        raise InvalidResultError("it holds no tensor")
    return tensors, metadata


def result_metadata(path: Path) -> dict[str, str]:
    """The metadata of a result file; :class:`InvalidResultError` when it is unreadable."""
    return _read_safetensors(path, lambda f: f.metadata() or {})


def _checked_report(metadata: dict[str, str], key: str) -> dict:
    """The report of a result's metadata, which must carry the job's key."""
    missing = [name for name in RESULT_METADATA if name not in metadata]
    if missing:
        raise InvalidResultError(f"metadata lacks {', '.join(missing)}")
    if metadata["key"] != key:
        found = metadata["key"][:KEY_CHARS_IN_NAMES]
        raise InvalidResultError(f"its key {found}... is not the job's")
    try:
        report = json.loads(metadata["report"])
    except ValueError as err:
        raise InvalidResultError(f"its report is not JSON: {err}") from err
    if not isinstance(report, dict):
        raise InvalidResultError("its report is not a JSON object")
    return report


def read_result(path: Path, name: str, key: str) -> LayerResult:
    """The verified result in ``path``: :class:`InvalidResultError` unless it opens, carries
    ``key``, a JSON report and the SHA-256 of its tensors."""
    tensors, metadata = _open_result(path)
    report = _checked_report(metadata, key)
    digest = result_digest(tensors)
    if digest != metadata[WEIGHT_DIGEST]:
        raise InvalidResultError("the weight's SHA-256 differs from the stored one")
    return LayerResult(name, str(path), digest, report, reused=True)


def valid_result(job: LayerJob) -> LayerResult | None:
    """The job's verified result, or None when it is missing or invalid (nothing deleted)."""
    try:
        return read_result(job.result_path(), job.name, job.result_key)
    except InvalidResultError:
        return None


def finished_result(job: LayerJob) -> LayerResult | None:
    """The job's verified result from an earlier run, or None: a resumed run skips the layer
    (and its activation cache) entirely. An invalid file is deleted, with a warning, so the
    layer is recomputed."""
    path = job.result_path()
    if not path.exists():
        return None
    try:
        result = read_result(path, job.name, job.result_key)
    except InvalidResultError as err:
        _discard(path, job.name, err)
        return None
    run_logger(__name__).info("%s: result reused (%s)", job.name, path.name)
    return result


def _discard(path: Path, name: str, err: InvalidResultError) -> None:
    """Delete an invalid result file, with one warning naming it and the reason."""
    run_logger(__name__).warning("%s: result %s is invalid (%s); deleted, recomputing",
                                 name, path, err)
    path.unlink(missing_ok=True)


def write_result(job: LayerJob, tensors: dict[str, torch.Tensor], report: dict) -> LayerResult:
    """Save a layer's result tensors (``weight``, learned input qparams) atomically with its
    key, report and digest."""
    digest = result_digest(tensors)
    world_size = job.result_world_size
    save_tensors(job.result_path(), tensors,
                 metadata={"report": json.dumps(report), "key": job.result_key,
                           WEIGHT_DIGEST: digest,
                           **({WORLD_SIZE: str(world_size)} if world_size else {})})
    return LayerResult(job.name, str(job.result_path()), digest, report)


def remove_partial_results(params: PipelineParams) -> int:
    """Delete temporary files a killed run left in ``results/layers`` (call under the
    output lock: no other run writes there); returns how many were removed."""
    removed = 0
    for tmp in (Path(params.runtime.results_dir) / "layers").glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    if removed:
        run_logger(__name__).info("removed %d partial result files of an interrupted run",
                                  removed)
    return removed
