"""Small typed values passed between tasks: paths and digests, never tensors or modules."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Artifact:
    """A file some task wrote, and the SHA-256 of its bytes."""

    path: str
    digest: str

    @property
    def file(self) -> Path:
        return Path(self.path)


@dataclass(frozen=True)
class LayerPlan:
    """The layers to round, in first-call order, and how often each runs per forward; how
    their inputs are captured (``one_pass`` or ``per_layer``) and, for ``per_layer``, why."""

    names: list[str]
    calls: dict[str, int] = field(default_factory=dict)
    capture_method: str = "per_layer"
    capture_note: str = ""
    cache_bytes: dict[str, int] = field(default_factory=dict)  # each layer's activation cache
    # granularity block: the layers of each block unit (a block is named in ``names`` in
    # place of its layers, and reconstructed as one resumable unit)
    blocks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # threads of the capture tasks (None: the engine's default), sized by the largest layer
    capture_threads: int | None = None


@dataclass(frozen=True)
class LayerResult:
    """One rounded layer: its result file, the SHA-256 of its rounded weight (which keys
    every later layer) and what AdaRound measured on it."""

    name: str
    path: str
    digest: str
    report: dict
    reused: bool = False
