"""Where each stage's outputs live (the same paths ``dvc.yaml`` declares)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.artifacts import Artifact
from tasks.io import file_digest
from tasks.params import PipelineParams


@dataclass(frozen=True)
class Layout:
    """Output paths of one pipeline configuration."""

    params: PipelineParams

    def _in(self, directory: str, name: str) -> Path:
        return Path(directory) / name

    @property
    def dataset_dir(self) -> Path:
        """The data stage's output (a DVC output directory)."""
        return self._in(self.params.runtime.data_dir, "dataset")

    @property
    def dataset(self) -> Path:
        """The data stage's manifest: what every later stage reads the data by."""
        return self.dataset_dir / "manifest.json"

    @property
    def float_checkpoint(self) -> Path:
        return self._in(self.params.runtime.checkpoint_dir, "float.safetensors")

    @property
    def calibrated_checkpoint(self) -> Path:
        return self._in(self.params.runtime.checkpoint_dir, "calibrated.safetensors")

    @property
    def adaround_checkpoint(self) -> Path:
        return self._in(self.params.runtime.checkpoint_dir, "adaround.safetensors")

    @property
    def export_dir(self) -> Path:
        return self._in(self.params.runtime.checkpoint_dir, "export")

    @property
    def onnx_model(self) -> Path:
        """The exported ONNX QDQ model (with ``model.encodings`` and integer weights beside)."""
        return self.export_dir / "model.onnx"

    @property
    def encodings(self) -> Path:
        return self.export_dir / "model.encodings"

    @property
    def integer_weights(self) -> Path:
        return self.export_dir / "model_int.safetensors"

    @property
    def example_inputs(self) -> Path:
        """A few input rows keyed by the ONNX model's input names (the registry's example)."""
        return self.export_dir / "example_inputs.safetensors"

    @property
    def layer_report(self) -> Path:
        return self._in(self.params.runtime.results_dir, "adaround_report.json")

    @property
    def metrics(self) -> Path:
        return self._in(self.params.runtime.results_dir, "metrics.json")

    @property
    def layer_plot(self) -> Path:
        return self._in(self.params.runtime.results_dir, "layer_errors.csv")

    @property
    def check_stamp(self) -> Path:
        """Written by ``python -m flows check`` (the first DVC stage) when everything passed;
        its bytes never change, so it triggers no later stage."""
        return self._in(self.params.runtime.results_dir, "params_checked.json")

    @property
    def lock(self) -> Path:
        return self._in(self.params.runtime.results_dir, ".pipeline.lock")


def existing(path: Path, stage: str) -> Artifact:
    """An output an earlier stage made; a clear error when it is missing."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist: run `python -m flows {stage}` "
                                f"(or `dvc repro`) first")
    return Artifact(str(path), file_digest(path))
