"""Where a result came from, as flat string tags: git commit, ``dvc.lock`` hashes, versions."""

from __future__ import annotations

import hashlib
import logging
import platform
import subprocess
from pathlib import Path

import yaml

from tasks.versioning import code_version, package_versions

logger = logging.getLogger(__name__)


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_tags() -> dict[str, str]:
    """The commit of the working directory and whether tracked files differ from it."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return {"git.commit": "unknown (not a git repository)"}
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {"git.commit": commit, "mlflow.source.git.commit": commit,
            "git.dirty": str(dirty).lower()}


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def dvc_lock_tags(lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """``dvc.<stage>.<out path>`` = md5 of each output recorded in ``dvc.lock``.

    An output file whose bytes no longer match the lock (a stage that has not finished
    yet, or a run outside ``dvc repro``) is left out, so every tag describes the files
    this run used. Directory outputs are tagged as recorded.
    """
    if not lock.is_file():
        return {}
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError as err:
        logger.warning("cannot read %s (%s): no dvc tags", lock, err)
        return {}
    tags = {}
    for stage, entry in stages.items():
        for out in entry.get("outs", []):
            path, md5 = Path(out.get("path", "")), out.get("md5")
            if not md5 or (path.is_file() and _md5(path) != md5):
                continue
            tags[f"dvc.{stage}.{path.as_posix()}"] = md5
    return tags


def provenance_tags() -> dict[str, str]:
    """All provenance tags of a run made in the current directory."""
    versions = {f"versions.{name}": version for name, version in package_versions().items()}
    return {**git_tags(), **dvc_lock_tags(), **versions,
            "versions.python": platform.python_version(),
            "adaround_core.code_version": code_version()}
