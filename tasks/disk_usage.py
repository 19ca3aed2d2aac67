"""Bytes a file or a directory tree holds on disk, as ``gc`` reports and benchmarks poll it."""

from __future__ import annotations

import os
from pathlib import Path


def tree_bytes(path: Path) -> int:
    """Bytes of a file, or of the files under a directory (links not followed), each file
    once: a directory renamed while the walk runs (a finished cache moved into
    ``cache/trash``) is not counted in both places, and a file removed meanwhile (or a
    path that does not exist) not at all."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size if os.path.lexists(path) else 0
    sizes: dict[tuple[int, int], int] = {}
    for root, _, files in os.walk(path):
        for name in files:
            try:
                stat = os.lstat(os.path.join(root, name))
            except OSError:  # removed while walking
                continue
            sizes[(stat.st_dev, stat.st_ino)] = stat.st_size
    return sum(sizes.values())
