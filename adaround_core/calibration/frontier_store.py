"""Where paused forward passes wait: in memory up to a budget, the rest on disk.

:class:`FrontierStore` holds one :class:`~adaround_core.calibration.segmented_forward.Frontier`
per calibration batch between two layers. Frontiers stay in memory while their total
stays under ``memory_budget`` bytes; the others are written with ``torch.save`` (which
keeps views of one storage sharing it, as in the live pass) to a private temporary
directory and read back, then deleted, when taken. So memory does not grow with the
number of batches.

:func:`save_frontiers` / :func:`load_frontiers` persist a whole layer boundary (every
batch's frontier, with a manifest naming the graph and each frontier's checksum) so another
process can continue the pass from there: the pipeline's per-layer tasks. Their bytes are
the bulk of a large model's capture, so each is written once straight from the tensors
(``torch.save`` to the file, no zip CRC) and read back once into fresh tensors (not
mapped: the next nodes write into them, and copy-on-write faults on a mapped file cost
about 4x a read); the checksum is taken over the tensor storages in memory on both sides. A writer with a
``hold_budget`` keeps frontiers in this process's memory instead, up to that many bytes
(:mod:`~adaround_core.calibration.held_frontiers`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.serialization import config as serialization_config

from adaround_core.calibration.background_writes import BackgroundWrites
from adaround_core.calibration.checksum import tree_checksum
from adaround_core.calibration.held_frontiers import HELD_FRONTIERS
from adaround_core.calibration.sample_store import CorruptCacheError
from adaround_core.calibration.segmented_forward import Frontier

Consume = bool | Callable[[Path], None]  # keep files read, delete them, or hand them over

# Frontier bytes kept in memory per model before spilling to disk: small models
# (every test, the digits demo) never touch the disk; large ones stay flat.
FRONTIER_MEMORY_BUDGET = 256 << 20
FRONTIER_MANIFEST = "frontiers.json"


class FrontierStore:
    """Per-batch frontiers of one model, by batch index."""

    def __init__(self, memory_budget: int = FRONTIER_MEMORY_BUDGET) -> None:
        self.memory_budget = memory_budget
        self._memory: dict[int, Frontier] = {}
        self._memory_bytes: dict[int, int] = {}
        self._on_disk: dict[int, int] = {}  # batch index -> position
        self._directory: Path | None = None

    def __len__(self) -> int:
        return len(self._memory) + len(self._on_disk)

    @property
    def spilled(self) -> int:
        """How many frontiers are on disk now."""
        return len(self._on_disk)

    def put(self, index: int, frontier: Frontier) -> None:
        size = frontier.nbytes()
        if sum(self._memory_bytes.values()) + size <= self.memory_budget:
            self._memory[index], self._memory_bytes[index] = frontier, size
            return
        torch.save(frontier.values, self._path(index))
        self._on_disk[index] = frontier.position

    def take(self, index: int) -> Frontier:
        """The frontier of batch ``index``, removed from the store."""
        if index in self._memory:
            del self._memory_bytes[index]
            return self._memory.pop(index)
        position = self._on_disk.pop(index)
        path = self._path(index)
        values = torch.load(path, weights_only=False)  # our own file, written just before
        path.unlink()
        return Frontier(position, values)

    def _path(self, index: int) -> Path:
        if self._directory is None:
            self._directory = Path(tempfile.mkdtemp(prefix="adaround-frontiers-"))
        return self._directory / f"{index:05d}.pt"

    def close(self) -> None:
        """Drop every frontier and remove the temporary directory."""
        self._memory.clear()
        self._memory_bytes.clear()
        self._on_disk.clear()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None


class FrontierWriter:
    """Writes one layer boundary's frontiers under ``directory`` (existing, empty) as they
    come, each checksummed from its tensors in memory (no second read), or holds them in
    this process's memory while everything held fits in ``hold_budget`` bytes less
    :meth:`spill_reserve`;
    :meth:`finish` writes the manifest that makes the directory valid. Files are written
    behind the caller (:mod:`~.background_writes`): nothing may change a frontier's
    tensors after it is given to :meth:`write`."""

    def __init__(self, directory: Path, fingerprint: str, hold_budget: int = 0) -> None:
        self.directory, self.fingerprint = Path(directory), fingerprint
        self.hold_budget = hold_budget
        self.token = HELD_FRONTIERS.new_token()
        self._files: list[dict] = []
        self._positions: set[int] = set()
        self._writes = BackgroundWrites()

    def write(self, frontier: Frontier) -> None:
        index = len(self._files)
        self._positions.add(frontier.position)
        if self.hold_budget and self._hold(index, frontier):
            self._files.append({"held": self.token})
            return
        self._files.append({})  # filled in by finish()
        self._writes.submit(self._write_file, index, frontier.values)

    def _hold(self, index: int, frontier: Frontier) -> bool:
        """Offer ``frontier`` to this process's held frontiers; whether they took it."""
        size = frontier.nbytes()
        return HELD_FRONTIERS.offer(self.token, index, frontier,
                                    self.hold_budget - self.spill_reserve(size), size)

    def spill_reserve(self, size: int) -> int:
        """Bytes of ``hold_budget`` kept free for the frontiers a spill has in memory
        besides the held ones: up to ``depth`` waiting to be written and one read back by
        the next capture, each of ``size`` bytes (the frontier being written). The budget
        then bounds every frontier in memory, so the peak stays where it is once the
        boundaries spill."""
        return (self._writes.depth + 1) * size

    def _write_file(self, index: int, values: dict[str, Any]) -> tuple[int, dict]:
        name = f"frontier_{index:05d}.pt"
        tmp = self.directory / f".{name}.tmp"
        # no zip CRC (the checksum covers the tensors) and no fsync (a torn write fails
        # the checksum or the load on use, and the pass restarts from the model input)
        with serialization_config.patch({"save.compute_crc32": False}):
            torch.save(values, tmp)
        os.replace(tmp, self.directory / name)
        return index, {"file": name, "checksum": tree_checksum(values)}

    def finish(self) -> int:
        """Wait for the files, write the manifest; the number of frontiers."""
        for index, entry in self._writes.results():
            self._files[index] = entry
        if len(self._positions) > 1:
            raise ValueError(f"frontiers at different positions {sorted(self._positions)}; "
                             f"save one layer boundary at a time")
        manifest = {"graph": self.fingerprint,
                    "position": min(self._positions) if self._positions else 0,
                    "files": self._files}
        tmp = self.directory / f".{FRONTIER_MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, self.directory / FRONTIER_MANIFEST)
        return len(self._files)

    def abandon(self) -> None:
        """Stop writing and forget the frontiers held so far (the boundary will not be
        finished)."""
        self._writes.cancel()
        HELD_FRONTIERS.drop({self.token})


def save_frontiers(directory: Path, frontiers: Iterable[Frontier], fingerprint: str) -> int:
    """Write every batch's frontier of one layer boundary under ``directory`` (existing,
    empty), then the manifest that makes it valid. Returns the number of batches."""
    writer = FrontierWriter(directory, fingerprint)
    for frontier in frontiers:
        writer.write(frontier)
    return writer.finish()


def frontier_manifest(directory: Path, fingerprint: str) -> dict:
    """The manifest :class:`FrontierWriter` wrote in ``directory``; raises
    :class:`CorruptCacheError` when it is missing or names another traced graph."""
    path = Path(directory) / FRONTIER_MANIFEST
    if not path.exists():
        raise CorruptCacheError(f"no frontier manifest in {directory} (incomplete)")
    manifest = json.loads(path.read_text())
    if manifest["graph"] != fingerprint:
        raise CorruptCacheError(f"frontiers in {directory} belong to another traced graph; "
                                f"delete the directory")
    return manifest


def load_frontiers(directory: Path, fingerprint: str, verify: bool = True,
                   consume: Consume = False) -> Iterator[Frontier]:
    """The frontiers written by :func:`save_frontiers`, one batch at a time, their tensors
    read from the files (with ``consume`` each file is deleted once read: the disk holds
    only what is still to be continued; a callable ``consume`` is given each file instead,
    e.g. to delete it off the critical path); held ones are taken out of this process's
    memory. Raises
    :class:`CorruptCacheError` when the manifest is missing, names another graph, or a
    frontier is missing (a held one: this process does not hold it), unreadable or (with
    ``verify``) does not match its checksum."""
    directory = Path(directory)
    manifest = frontier_manifest(directory, fingerprint)
    for index, entry in enumerate(manifest["files"]):
        if "held" in entry:
            yield _held(directory, entry["held"], index, manifest["position"])
            continue
        file = directory / entry["file"]
        if not file.exists():
            raise CorruptCacheError(f"frontier {file} is missing")
        try:
            values = torch.load(file, weights_only=True)
        except Exception as err:  # noqa: BLE001 - a torn or damaged file, whatever torch says
            raise CorruptCacheError(f"frontier {file} cannot be read ({err})") from None
        finally:
            if callable(consume):
                consume(file)
            elif consume:
                file.unlink()
        if verify and tree_checksum(values) != entry.get("checksum"):
            raise CorruptCacheError(f"frontier {file} does not match its checksum")
        yield Frontier(manifest["position"], values)


def _held(directory: Path, token: str, index: int, position: int) -> Frontier:
    frontier = HELD_FRONTIERS.take(token, index)
    if frontier is None:
        raise CorruptCacheError(held_elsewhere(directory, index))
    if frontier.position != position:
        raise CorruptCacheError(f"held frontier {index} of {directory} is at another node")
    return frontier


def held_elsewhere(directory: Path, index: int) -> str:
    """Why a held frontier cannot be continued."""
    return (f"frontier {index} of {directory} was held in the memory of the process that "
            f"wrote it (another process, or one that has ended)")


def frontiers_present(directory: Path, manifest: dict) -> bool:
    """Whether every frontier the manifest names is still there: its file, or held here."""
    return all(HELD_FRONTIERS.holds(entry["held"], index) if "held" in entry
               else (Path(directory) / entry["file"]).is_file()
               for index, entry in enumerate(manifest["files"]))


def release_held(directory: Path) -> None:
    """Forget the frontiers of the boundary in ``directory`` (its ``quant`` and ``float``
    parts) held in this process's memory, before the directory is deleted."""
    tokens = set()
    for manifest in Path(directory).glob(f"*/{FRONTIER_MANIFEST}"):
        try:
            entries = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        tokens.update(entry["held"] for entry in entries if isinstance(entry, dict)
                      and "held" in entry)
    HELD_FRONTIERS.drop(tokens)
