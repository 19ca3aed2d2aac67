"""``params.yaml`` -> one typed, validated, frozen :class:`PipelineParams`.

The one owner of the pipeline's configuration: loading the file, applying ``-S
section.key=value`` overrides, validation, and :class:`PreflightError`, the error of a
failed check. An unknown key or a wrong type is an error naming the key
(``adaround.num_step: unknown key; did you mean 'num_steps'?``). The engine's own
settings (``QConfig``, ``AdaRoundConfig``) are embedded whole as the ``quant`` and
``adaround`` sections.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from adaround_core.quant.qconfig import QConfig
from adaround_core.reconstruction.reconstruction_config import AdaRoundConfig

DEFAULT_PARAMS = Path("params.yaml")
REGISTRY_NAME_BAN = ("/", ":")  # characters MLflow refuses in a registered model name
DEMO_TRAIN_KWARGS = {"epochs": 30, "batch_size": 64, "lr": 3e-3}


class PreflightError(RuntimeError):
    """The configuration cannot work; the message names the setting and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataParams(_Section):
    # module:function -> the digits-style dict of tensors, or {"calibration": Dataset,
    # "evaluation": Dataset, "train": ... (optional)} (tasks/datasets.py)
    source: str = "adaround_core.demo.digits:digits_dataset"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    batch_process: str | None = None  # module:function(batch) -> model input (datasets only)


class ModelParams(_Section):
    factory: str = "adaround_core.demo.models:DigitsCNN"  # module:function -> float nn.Module
    kwargs: dict[str, Any] = Field(default_factory=dict)
    pretrained: str | None = None  # a state_dict file (safetensors or torch); skips training
    # a factory that loads its own weights: set train.trainer to null


class TrainParams(_Section):
    # module:function(model, dataset, *, seed, **kwargs) -> the trained nn.Module; null: the
    # factory's weights as they are (also skipped when model.pretrained is set)
    trainer: str | None = "adaround_core.demo.training:train_on_dataset"
    kwargs: dict[str, Any] = Field(default_factory=lambda: dict(DEMO_TRAIN_KWARGS))


class CalibrationParams(_Section):
    batch_size: int = Field(32, ge=1)
    num_samples: int = Field(256, ge=1)  # first samples of the calibration data used


class EvalParams(_Section):
    # module:function(model, loader, *, float_model) -> {name: number} (tasks/metrics.py)
    metric: str = "adaround_core.demo.training:top1_metric"
    batch_size: int = Field(512, ge=1)
    # ONNX Runtime vs PyTorch: argmax (classifier logits), cosine (any other output), or
    # auto: argmax for one 2-D output, else cosine
    onnx_parity: Literal["auto", "argmax", "cosine"] = "auto"


class TrackingParams(_Section):
    enabled: bool = True
    experiment: str = "adaround"
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here
    registered_model: str | None = None  # MLflow Model Registry name; None: nothing registered
    promote_metric: str | None = None  # None: the first number eval.metric returns
    higher_is_better: bool = True  # direction of promote_metric
    promote_tolerance: float = Field(0.0, ge=0)  # champion moves if >= champion - tolerance

    @field_validator("registered_model")
    @classmethod
    def _registry_name(cls, value: str | None) -> str | None:
        if value is not None and (value.strip() in ("", ".", "..")
                                  or set(value) & set(REGISTRY_NAME_BAN)):
            raise ValueError(f"MLflow rejects {value!r} as a registered model name: give a "
                             f"name other than '.' or '..' without "
                             f"{' or '.join(REGISTRY_NAME_BAN)}")
        return value


class RuntimeParams(_Section):
    seed: int = 0
    task_runner: Literal["threads", "dask"] = "threads"
    dask_address: str | None = None  # scheduler address of an existing Dask cluster
    max_workers: int = Field(2, ge=1)
    data_dir: str = "data"
    checkpoint_dir: str = "checkpoints"
    results_dir: str = "results"
    cache_dir: str = "cache"
    lock_timeout: float = Field(60.0, ge=0)  # seconds to wait for another run on these dirs
    keep_cache: bool = False  # keep each layer's activation cache after its result is written
    # MiB of paused forward passes a layer's capture hands to the next one in memory
    # instead of on disk (0: all on disk; unused with keep_cache, whose are kept on disk).
    # The budget covers the frontiers on their way to and from disk too, and the peak memory
    # grows with the samples until it is full: 640 is below what a ResNet-18 at 224 px has
    # at its first boundaries with 512 samples, so its peak at 1024 stays level (BENCHMARKS.md)
    frontier_memory_mb: int = Field(640, ge=0)
    # which of a layer's tasks keep the memory they free for their next allocations instead
    # of mapping it afresh (faster; the capture's can raise the peak: tasks/allocator.py)
    reuse_freed_memory: Literal["all", "rounding", "none"] = "all"
    device: str = "cpu"  # calibration, activation caching, AdaRound, evaluation: cpu | cuda[:N] | auto

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", value):
            raise ValueError("must be cpu, cuda, cuda:N or auto (cuda when one is present)")
        return value


class PipelineParams(_Section):
    """Every knob of the pipeline, by ``params.yaml`` section."""

    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    quant: QConfig = QConfig()
    calibration: CalibrationParams = CalibrationParams()
    adaround: AdaRoundConfig = AdaRoundConfig()
    eval: EvalParams = EvalParams()
    tracking: TrackingParams = TrackingParams()
    runtime: RuntimeParams = RuntimeParams()

    def digest(self, *sections: str) -> str:
        """SHA-256 of the named sections (all when none are named)."""
        dump = self.model_dump(mode="json")
        chosen = {k: dump[k] for k in (sections or dump)}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()

    def flat(self) -> dict[str, Any]:
        """``{"adaround.num_steps": 100, ...}``: the config as flat key/value pairs."""
        return _flatten(self.model_dump(mode="json"))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_params(raw: dict[str, Any] | None) -> PipelineParams:
    """Validate a params mapping; raise ``ValueError`` naming the bad key."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ValueError("params must be a mapping of sections")
    _reject_unknown_keys(raw, PipelineParams, "")
    try:
        params = PipelineParams(**raw)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"params.yaml: {key}: {first['msg']} (got {first.get('input')!r})") from None
    return params


def _reject_unknown_keys(raw: dict[str, Any], model: type[BaseModel], prefix: str) -> None:
    for key, value in raw.items():
        field = model.model_fields.get(key)
        if field is None:
            hint = difflib.get_close_matches(str(key), list(model.model_fields), n=1)
            tip = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ValueError(f"params.yaml: {prefix}{key}: unknown key{tip}")
        sub = field.annotation
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            _reject_unknown_keys(value, sub, f"{prefix}{key}.")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a params mapping."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        *parents, leaf = key.split(".")
        node = raw
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                where = ".".join(parents[: depth + 1])
                raise ValueError(f"override {item!r}: {where} is a value, not a section; "
                                 f"write {where}=VALUE")
        node[leaf] = _yaml_value(item, value)
    return raw


def _yaml_value(item: str, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"override {item!r}: the value is not valid YAML "
                         f"({_yaml_problem(err)})") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong, and where."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return f"{where}{problem}"


def with_overrides(params: PipelineParams, overrides: list[str]) -> PipelineParams:
    """``params`` with ``-S`` overrides applied, validated again."""
    if not overrides:
        return params
    return parse_params(apply_overrides(params.model_dump(mode="json"), list(overrides)))


def read_params_file(path: Path) -> dict[str, Any]:
    """The mapping in ``path``: a missing, unreadable, empty or non-mapping file is an error
    naming the file (never a silent fall-back to built-in defaults)."""
    if not path.is_file():
        raise FileNotFoundError(f"params file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML ({_yaml_problem(err)}); fix the file "
                         f"(`git diff {path.name}` shows what changed)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} cannot be read: {err}") from None
    if raw is None or raw == {}:
        raise ValueError(f"{path} is empty; it must hold the pipeline's sections "
                         f"({', '.join(PipelineParams.model_fields)}); restore it, e.g. "
                         f"`git checkout {path.name}`")
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds a {type(raw).__name__}, not a mapping of sections "
                         f"({', '.join(PipelineParams.model_fields)})")
    return raw


def load_params(path: str | Path = DEFAULT_PARAMS,
                overrides: list[str] | tuple[str, ...] = ()) -> PipelineParams:
    """Read and validate ``params.yaml``, then apply and validate the ``-S`` overrides."""
    return with_overrides(parse_params(read_params_file(Path(path))), list(overrides))
