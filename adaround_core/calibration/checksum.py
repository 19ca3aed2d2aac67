"""Checksums of the bytes a run caches (activation shards, paused forward passes).

A cache is a shortcut recomputed when it is damaged, so its checksum has to catch torn
writes and bit rot, not tampering: xxh3-128 does that at memory speed (about 10 GB/s here,
where SHA-256 manages 1.4 GB/s, and a 224-pixel ResNet capture hashes tens of GB).
:func:`file_sha256` is the content identity of files that are kept (checkpoints, data).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
import xxhash

from adaround_core.torch_private import tree_leaves

_CHUNK = 4 << 20  # bytes hashed or read at a time: a chunk stays in the CPU's cache


def buffer_checksum(buffers: Iterable[Any]) -> str:
    """xxh3-128 of ``buffers`` (bytes-like) one after the other, as a hex string."""
    digest = xxhash.xxh3_128()
    for buffer in buffers:
        digest.update(buffer)
    return digest.hexdigest()


def write_checksummed(file: BinaryIO, buffer: Any) -> str:
    """Write ``buffer`` (bytes-like) to ``file`` chunk by chunk, each hashed just after it
    is written, while it is in the CPU's cache; its :func:`buffer_checksum`."""
    view = memoryview(buffer).cast("B")
    digest = xxhash.xxh3_128()
    for start in range(0, len(view), _CHUNK):
        chunk = view[start:start + _CHUNK]
        file.write(chunk)
        digest.update(chunk)
    return digest.hexdigest()



def _file_chunks(path: Path) -> Iterator[bytes]:
    """A file's bytes in :data:`_CHUNK` pieces."""
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def file_checksum(path: Path) -> str:
    """:func:`buffer_checksum` of a file's bytes."""
    return buffer_checksum(_file_chunks(path))


def storage_bytes(tensor: torch.Tensor) -> Any:
    """The bytes of ``tensor``'s whole storage, without a copy (a CPU tensor)."""
    storage = tensor.untyped_storage()
    return torch.empty(0, dtype=torch.uint8).set_(storage).numpy() if storage.nbytes() else b""


def distinct_storages(values: Any) -> list[torch.Tensor]:
    """One tensor per distinct non-empty storage among the tensors in ``values`` (a nest
    of containers), in order of first appearance: views of one storage count once."""
    storages: dict[tuple[torch.device, int], torch.Tensor] = {}
    for leaf in tree_leaves(values):
        if isinstance(leaf, torch.Tensor) and leaf.untyped_storage().nbytes():
            storage = leaf.untyped_storage()
            storages.setdefault((storage.device, storage.data_ptr()), leaf)
    return list(storages.values())


def shares_storage(a: torch.Tensor, b: Any) -> bool:
    """Whether ``b`` is a tensor on the same storage as ``a`` (a view or ``a`` itself)."""
    return isinstance(b, torch.Tensor) and \
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def tree_checksum(values: Any) -> str:
    """:func:`buffer_checksum` of the :func:`distinct_storages` of ``values``."""
    return buffer_checksum(storage_bytes(t) for t in distinct_storages(values))


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    for chunk in _file_chunks(path):
        digest.update(chunk)
    return digest.hexdigest()
