"""Deleting a finished layer's cache without waiting for it.

Freeing gigabytes of cache files takes seconds per layer. The directory is moved into
``<cache_dir>/trash`` at once (a rename on the same file system) and deleted there by one
background thread: the frontiers a capture continued while its layer is rounded (each
frontier file as soon as it is read), a layer's cache while the next task rebuilds its models (:func:`wait_for_removals` before the next
capture writes, so the disk peak stays at one layer's files). :func:`finish_removals` waits
at the end of the stage. What a killed run left in the trash is deleted by the next stage.
"""

from __future__ import annotations

import os
import shutil
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

TRASH = "trash"
_REMOVER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-removal")
_PENDING: list[Future] = []


def remove_in_background(path: Path, cache_dir: Path) -> None:
    """Move ``path`` (a directory under ``cache_dir``) out of the way now; delete it later."""
    if not path.exists():
        return
    trash = Path(cache_dir) / TRASH
    trash.mkdir(parents=True, exist_ok=True)
    target = trash / f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        os.replace(path, target)
    except OSError:  # another file system or a race: delete in place
        shutil.rmtree(path, ignore_errors=True)
        return
    _PENDING.append(_REMOVER.submit(shutil.rmtree, target, True))


def unlink_in_background(file: Path) -> None:
    """Delete ``file`` (a frontier just read) by the background thread: unlinking a file
    the kernel is still writing back waits for the disk (about 80 ms for 100 MB here)."""
    _PENDING.append(_REMOVER.submit(_unlink, Path(file)))


def _unlink(file: Path) -> None:
    file.unlink(missing_ok=True)


def wait_for_removals() -> None:
    """Wait until this process's deletions are done (before writing the next cache, so
    that the disk holds at most one layer's cache and frontiers at a time)."""
    while _PENDING:
        _PENDING.pop().result()


def finish_removals(cache_dir: Path) -> None:
    """Wait for this process's deletions, then delete what other (killed) runs left."""
    wait_for_removals()
    trash = Path(cache_dir) / TRASH
    if trash.is_dir():
        for leftover in trash.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
