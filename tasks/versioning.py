"""Versions that key cached results: the engine's code, and package versions."""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata
from pathlib import Path

import adaround_core

TRACKED_PACKAGES = ("torch", "numpy", "prefect", "mlflow", "dvc", "safetensors", "pydantic")


@functools.cache
def code_version() -> str:
    """SHA-256 over the engine's source files: editing any of them invalidates results."""
    root = Path(adaround_core.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on."""
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
