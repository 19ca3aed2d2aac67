"""``EngineConfig``: the one configuration style of the engine.

Every settings object of the engine (``QConfig``, ``AdaRoundConfig``) derives from it: a
frozen, strictly typed pydantic model that rejects unknown keys, suggests the closest known
one (``num_step`` -> ``num_steps``) and raises a one-line ``ValueError`` naming the key.
The pipeline embeds these objects whole in its own configuration.
"""

from __future__ import annotations

import difflib
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

C = TypeVar("C", bound="EngineConfig")


class EngineConfig(BaseModel):
    """Base of the engine's validated, frozen settings.

    ``Config(key=value)`` raises pydantic's ``ValidationError`` (a ``ValueError``) naming the
    field; :meth:`from_dict` raises the same as one line, and suggests the closest key.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    config_label: ClassVar[str] = "config"  # how errors name the mapping the values came from

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any] | None) -> C:
        """Validate a mapping of settings (None: all defaults); the mapping is not modified."""
        values = dict(values or {})
        reject_unknown_keys(cls, values, cls.config_label)
        try:
            return cls(**values)
        except ValidationError as err:
            raise ValueError(describe_errors(err, cls.config_label)) from None


def reject_unknown_keys(model: type[BaseModel], values: dict[str, Any], label: str) -> None:
    """Raise ``ValueError`` for the first key ``model`` does not have, with a suggestion."""
    for key in values:
        if key not in model.model_fields:
            hint = difflib.get_close_matches(str(key), list(model.model_fields), n=1)
            tip = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ValueError(f"unknown key {key!r} in {label}{tip} "
                             f"(known keys: {', '.join(model.model_fields)})")


def describe_errors(err: ValidationError, label: str) -> str:
    """pydantic's errors as one line: ``label['key']: what is wrong (got value)``."""
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or label
        parts.append(f"{label}[{key!r}]: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(parts)
