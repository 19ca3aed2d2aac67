"""One layer's AdaRound job: what it depends on, its keys, and its model.

A job is keyed by the digests of everything its result depends on: the dataset,
the calibrated checkpoint, the config sections involved, the engine's code, and
the result of every earlier layer. Change any of them and exactly the jobs that
depend on it get new keys; everything else is reused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from adaround_core.model_modes import float_reference
from tasks.artifacts import Artifact, LayerResult
from tasks.io import load_tensors
from tasks.model_state import (
    apply_rounded_weight,
    calibration_batches,
    compute_device,
    load_calibrated_model,
)
from tasks.params import PipelineParams
from tasks.versioning import code_version

# Settings that cannot change a layer's result: the progress bar; which layers are left
# out (a layer's own result does not depend on it, and the layers before it are in
# ``previous``); num_batches (the pipeline always passes every calibration batch).
ROUNDING_KEYS_IGNORED = {"progress", "exclude_prefix", "num_batches"}


@dataclass(frozen=True)
class LayerJob:
    """Everything a per-layer task needs, as paths, digests and small values."""

    params: PipelineParams
    dataset: Artifact
    float_model: Artifact
    calibrated: Artifact
    name: str
    calls: int
    previous: tuple[LayerResult, ...]

    def _digest(self, *extra: object) -> str:
        payload = [self.dataset.digest, self.calibrated.digest, code_version(), self.name,
                   self.calls, [r.digest for r in self.previous],
                   self.params.digest("quant", "calibration"),
                   compute_device(self.params).type, *extra]  # the GPU's sums differ
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    @property
    def cache_key(self) -> str:
        """Key of the layer's cached activations."""
        return self._digest()

    @property
    def result_key(self) -> str:
        """Key of the layer's rounding result (adds the AdaRound settings)."""
        rounding = self.params.adaround.model_dump(mode="json", exclude=ROUNDING_KEYS_IGNORED)
        return self._digest(rounding)

    def cache_dir(self) -> Path:
        return (Path(self.params.runtime.cache_dir) / "activations"
                / f"{self.name}--{self.cache_key[:24]}")

    def result_path(self) -> Path:
        return (Path(self.params.runtime.results_dir) / "layers"
                / f"{self.name}--{self.result_key[:24]}.safetensors")

    def build_models(self) -> tuple[nn.Module, nn.Module]:
        """The quantized model with earlier layers rounded, and the float reference."""
        model = _calibrated_model(self)
        reference = float_reference(model)
        for result in self.previous:
            apply_rounded_weight(model, result.name, load_tensors(Path(result.path))["weight"])
        return model, reference

    def batches(self) -> list:
        return calibration_batches(self.params, load_tensors(self.dataset.file))


_MODELS: OrderedDict[tuple, nn.Module] = OrderedDict()  # calibrated models of this process
_MODELS_LOCK = threading.Lock()
_MODELS_KEPT = 2


def _calibrated_model(job: LayerJob) -> nn.Module:
    """A fresh copy of the job's calibrated model. Preparing it (BatchNorm folding runs a
    forward pass) costs more than copying, and every layer's two tasks need it: it is built
    once per process and checkpoint (keyed by digests, never mutated) and copied."""
    key = (job.dataset.digest, job.float_model.digest, job.calibrated.digest,
           job.params.digest("model", "quant", "calibration"), job.params.runtime.device)
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            batches = calibration_batches(job.params, load_tensors(job.dataset.file))
            model = load_calibrated_model(job.params, job.float_model.file, job.calibrated.file,
                                          batches[0])
            _MODELS[key] = model
            while len(_MODELS) > _MODELS_KEPT:
                _MODELS.popitem(last=False)
        _MODELS.move_to_end(key)
        return copy.deepcopy(model)
