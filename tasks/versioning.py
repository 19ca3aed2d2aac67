"""What keys cached results (the engine's code, a model's source) and what tags runs (package versions)."""

from __future__ import annotations

import functools
import hashlib
import importlib
from importlib import metadata
from pathlib import Path

import adaround_core

TRACKED_PACKAGES = ("torch", "numpy", "prefect", "mlflow", "dvc", "safetensors", "pydantic")
NOT_ENGINE = ("demo", "export")  # subpackages of adaround_core that round nothing


@functools.cache
def code_version() -> str:
    """SHA-256 over the engine's source files (not the demo's): editing any of them
    invalidates results."""
    return tree_digest(Path(adaround_core.__file__).parent, NOT_ENGINE)


def tree_digest(root: Path, skip: tuple[str, ...] = ()) -> str:
    """SHA-256 over the names and bytes of the ``.py`` files under ``root``, leaving out the
    top-level folders named in ``skip``."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.parts[0] in skip:
            continue
        digest.update(relative.as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.cache
def source_digest(spec: str) -> str:
    """SHA-256 of the source file of the module of ``"package.module:function"`` (the
    model's code keys its results: a changed forward pass must not reuse them); the
    module's name alone when it has no source file."""
    module = importlib.import_module(spec.partition(":")[0])
    path = getattr(module, "__file__", None)
    if path is None or not Path(path).is_file():
        return hashlib.sha256(module.__name__.encode()).hexdigest()
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on."""
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
