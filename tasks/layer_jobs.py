"""One layer's AdaRound job: what it depends on, its keys, and its model.

A job is keyed by the digests of everything its result depends on: the dataset,
the calibrated checkpoint, the config sections involved, the engine's code, and
the result of every earlier layer. Change any of them and exactly the jobs that
depend on it get new keys; everything else is reused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from adaround_core.model_modes import float_reference
from tasks.artifacts import Artifact, LayerResult
from tasks.io import load_tensors
from tasks.model_state import apply_rounded_weight, calibration_batches, load_calibrated_model
from tasks.params import PipelineParams
from tasks.versioning import code_version

ROUNDING_KEYS_IGNORED = {"progress"}  # settings that cannot change a result


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
                   self.params.digest("quant", "calibration"), *extra]
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
        return Path(self.params.runtime.cache_dir) / "activations" / f"{self.name}--{self.cache_key[:24]}"

    def result_path(self) -> Path:
        return (Path(self.params.runtime.results_dir) / "layers"
                / f"{self.name}--{self.result_key[:24]}.safetensors")

    def build_models(self) -> tuple[nn.Module, nn.Module]:
        """The quantized model with earlier layers rounded, and the float reference."""
        batches = calibration_batches(self.params, load_tensors(self.dataset.file))
        model = load_calibrated_model(self.params, self.float_model.file, self.calibrated.file,
                                      batches[0])
        reference = float_reference(model)
        for result in self.previous:
            apply_rounded_weight(model, result.name, load_tensors(Path(result.path))["weight"])
        return model, reference

    def batches(self) -> list:
        return calibration_batches(self.params, load_tensors(self.dataset.file))
