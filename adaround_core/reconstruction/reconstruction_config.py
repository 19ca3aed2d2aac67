"""``AdaRoundConfig``: the validated form of ``custom_config_dict``.

The seed's keys keep the seed's names and defaults; the extra keys are ours.
Validation and errors are those of every engine config (:mod:`adaround_core.config`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from adaround_core.config import EngineConfig

SINGLE_PROCESS_KEYS = ("granularity", "drop_prob", "activation_lr")


class AdaRoundConfig(EngineConfig):
    """Settings of :func:`weight_reconstruction` (``docs/weight_reconstruction.md``)."""

    config_label: ClassVar[str] = "custom_config_dict"

    # The seed's keys.
    num_batches: int = Field(10, ge=1, description="DataLoader batches used (lists use all)")
    num_steps: int = Field(100, ge=1, description="optimisation steps per layer")
    exclude_prefix: list[str] = Field(default_factory=list, description="module name prefixes left as they are")
    warm_up: float = Field(0.2, ge=0.0, le=1.0, description="fraction of steps without the regulariser")
    weight: float = Field(0.01, ge=0.0, description="lambda, weight of the rounding regulariser")
    b_range: tuple[float, float] = Field((20.0, 2.0), description="beta decays linearly from [0] to [1]")
    # Ours.
    lr: float = Field(1e-2, gt=0.0, description="Adam learning rate of the rounding variables")
    batch_size: int | None = Field(None, ge=1, description="samples per step; None: the calibration batch size")
    seed: int = Field(0, description="seed of sampling and of the held-out split")
    guard: Literal["layer", "output", "off"] = Field(
        "layer", description="keep a unit's nearest state where its learned one is worse on "
                             "held-out samples: the unit's output (layer) or the model's "
                             "(output); True/False are read as layer/off")
    guard_batches: int = Field(1, ge=1, description="calibration batches held out for guard=output")
    holdout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of cached samples kept for evaluation")
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads; None: chosen automatically")
    progress: bool = Field(True, description="show a progress bar")
    # Beyond layer-wise AdaRound (README, "Block reconstruction, QDrop, learned activation scales").
    granularity: Literal["layer", "block"] = Field(
        "layer", description="reconstruct each layer, or each block (BRECQ) with its layers jointly")
    blocks: list[str] | None = Field(None, description="block module names; None: found automatically")
    drop_prob: float = Field(0.0, ge=0.0, lt=1.0, description="QDrop: chance an activation stays float")
    activation_lr: float | None = Field(None, gt=0.0, description="learned activation scales (LSQ): Adam lr relative to each calibrated scale; None: off")

    @property
    def trains_activations(self) -> bool:
        """Whether the unit's activation fake-quants take part in the optimisation (QDrop or
        learned scales): such units need autograd through the whole unit."""
        return self.drop_prob > 0.0 or self.activation_lr is not None

    @property
    def single_process_settings(self) -> dict[str, Any]:
        """The settings of block reconstruction, QDrop and learned scales that differ from
        their defaults: only one process runs them (torchrun's data-parallel rounding
        refuses them)."""
        return {key: getattr(self, key) for key in SINGLE_PROCESS_KEYS
                if getattr(self, key) != type(self).model_fields[key].default}

    @field_validator("exclude_prefix", "blocks", mode="before")
    @classmethod
    def _prefixes_not_a_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError(f"must be a list of prefixes, not the string {value!r}; "
                             f"write [{value!r}]")
        if isinstance(value, tuple):
            return list(value)
        return value

    @field_validator("guard", mode="before")
    @classmethod
    def _guard_from_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # the seed-era boolean: True was the layer guard
            return "layer" if value else "off"
        return value

    @model_validator(mode="after")
    def _blocks_need_block_granularity(self) -> AdaRoundConfig:
        if self.blocks is not None and self.granularity != "block":
            raise ValueError("'blocks' is given but granularity is 'layer'; "
                             "set granularity: block (or leave blocks out)")
        return self

    @field_validator("b_range", mode="before")
    @classmethod
    def _b_range_from_list(cls, value: Any) -> Any:
        if isinstance(value, list):
            return tuple(value)
        return value

    @field_validator("b_range", mode="after")
    @classmethod
    def _b_range_decreasing_positive(cls, value: tuple[float, float]) -> tuple[float, float]:
        start, end = value
        if not (start > 0 and end > 0):
            raise ValueError(f"values must be positive, got {list(value)}")
        if start <= end:
            raise ValueError(f"must decrease (start > end), got {list(value)}")
        return value
