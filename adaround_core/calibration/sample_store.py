"""Row stores behind a layer's cached samples: in memory, or as shards on disk.

A store holds rows (slices along dim 0) of one tensor shape and returns any rows
by index. :class:`ShardStore` keeps them in raw binary shards described by a
manifest (shape, dtype, checksum), and reads rows with ``os.pread``, so memory
stays flat whatever the number of cached samples. A fake-quantized input is written as
its integer grid indices (:mod:`~.activation_codes`, a quarter of the bytes; the shard's
``grid`` holds the scale and zero point) and decoded, bit for bit, when read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch

from adaround_core.calibration.activation_codes import DECODED_DTYPE, ActivationCodes, decode
from adaround_core.calibration.background_writes import BackgroundWrites
from adaround_core.calibration.checksum import file_checksum, write_checksummed

MANIFEST = "manifest.json"


class RowStore(Protocol):
    """Rows of one shape; ``gather`` returns them on ``device`` in the order asked."""

    num_rows: int
    row_shape: tuple[int, ...]
    row_nbytes: int  # bytes of one row

    def gather(self, index: torch.Tensor) -> torch.Tensor: ...

    def advise(self, index: torch.Tensor) -> None:
        """Say the rows at ``index`` will be gathered next (a disk store starts reading)."""


class TensorStore:
    """Rows of a tensor held in memory (on the model's device)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.num_rows = tensor.shape[0]
        self.row_shape = tuple(tensor.shape[1:])
        self.row_nbytes = tensor[0].nbytes if self.num_rows else 0

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        return self.tensor.index_select(0, index.to(self.tensor.device))

    def advise(self, index: torch.Tensor) -> None:
        """In memory already: nothing to do."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard file: ``rows`` rows of ``row_shape`` and ``dtype``, with its checksum."""

    file: str
    rows: int
    row_shape: tuple[int, ...]
    dtype: str
    checksum: str  # adaround_core.calibration.checksum.buffer_checksum of the file
    grid: tuple[float, float] | None = None  # (scale, zero point) of integer codes


class CorruptCacheError(RuntimeError):
    """A shard is missing, truncated or does not match its manifest checksum."""


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def write_shard(directory: Path, file: str,
                tensor: torch.Tensor | ActivationCodes) -> ShardInfo:
    """Write ``tensor`` (or the codes of one) as a raw shard (temporary name, then rename);
    return its info.

    The bytes are written and checksummed straight from the tensor's memory. There is no
    fsync: a cache is a shortcut, and a shard torn by a crash fails its checksum when the
    cache is next reused (:func:`read_manifest`), so it is recomputed."""
    grid = None
    if isinstance(tensor, ActivationCodes):
        grid = (float(tensor.scale.reshape(())), float(tensor.zero_point.reshape(())))
        tensor = tensor.codes
    data = tensor.detach().contiguous().cpu()
    raw = data.view(torch.uint8).numpy() if data.numel() else b""
    tmp = directory / f".{file}.tmp"
    with open(tmp, "wb") as f:
        checksum = write_checksummed(f, raw)
    os.replace(tmp, directory / file)
    return ShardInfo(file, data.shape[0], tuple(data.shape[1:]), str(data.dtype), checksum,
                     grid)


def write_manifest(directory: Path, groups: dict[str, list[ShardInfo]]) -> None:
    """Atomically write the manifest that makes a cache directory valid."""
    payload = {name: [asdict(s) for s in shards] for name, shards in groups.items()}
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, directory / MANIFEST)


def read_manifest(directory: Path, verify: bool = True) -> dict[str, list[ShardInfo]]:
    """The manifest of a cache directory; with ``verify``, every shard's size and checksum
    are checked. Raises :class:`CorruptCacheError` on any mismatch or a missing manifest."""
    path = directory / MANIFEST
    if not path.exists():
        raise CorruptCacheError(f"no manifest in {directory} (cache incomplete)")
    try:
        groups = {name: [ShardInfo(s["file"], s["rows"], tuple(s["row_shape"]), s["dtype"],
                                   s["checksum"], _grid(s.get("grid"))) for s in shards]
                  for name, shards in json.loads(path.read_text()).items()}
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptCacheError(f"the manifest in {directory} is unreadable or written by "
                                f"another version ({type(err).__name__}: {err})") from None
    if verify:
        for shards in groups.values():
            for shard in shards:
                _verify(directory, shard)
    return groups


def _grid(value: list | None) -> tuple[float, float] | None:
    if value is None:
        return None
    scale, zero_point = value
    return float(scale), float(zero_point)


def _verify(directory: Path, shard: ShardInfo) -> None:
    path = directory / shard.file
    if not path.exists():
        raise CorruptCacheError(f"shard {path} is missing")
    if path.stat().st_size != _row_bytes(shard) * shard.rows:
        raise CorruptCacheError(f"shard {path} has the wrong size (partial write?)")
    if file_checksum(path) != shard.checksum:
        raise CorruptCacheError(f"shard {path} does not match its checksum")


def _row_bytes(shard: ShardInfo, decoded: bool = False) -> int:
    """Bytes of one of ``shard``'s rows in its file, or ``decoded`` (codes as the floats
    they decode to)."""
    numel = 1
    for d in shard.row_shape:
        numel *= d
    dtype = DECODED_DTYPE if decoded and shard.grid is not None else _dtype(shard.dtype)
    return numel * dtype.itemsize


class ShardStore:
    """Rows spread over shard files of one shape, read on demand with ``os.pread`` (codes
    decoded: ``row_nbytes`` is a returned row's size, ``stored_row_nbytes`` a row's in the
    file)."""

    def __init__(self, directory: Path, shards: Iterable[ShardInfo],
                 device: torch.device | str = "cpu") -> None:
        self.shards = list(shards)
        if len({(s.row_shape, s.dtype, s.grid) for s in self.shards}) != 1:
            raise ValueError("a ShardStore needs shards of one row shape, dtype and grid")
        self.directory = Path(directory)
        self.row_shape = self.shards[0].row_shape
        self.dtype = _dtype(self.shards[0].dtype)  # of the bytes in the files
        grid = self.shards[0].grid
        self.grid = None if grid is None else \
            tuple(torch.tensor([v], dtype=DECODED_DTYPE) for v in grid)
        self.device = torch.device(device)
        self.stored_row_nbytes = _row_bytes(self.shards[0])
        self.row_nbytes = _row_bytes(self.shards[0], decoded=True)
        starts = [0]
        for s in self.shards:
            starts.append(starts[-1] + s.rows)
        self._starts = torch.tensor(starts)
        self.num_rows = starts[-1]
        self._fds: dict[str, int] = {}

    def _fd(self, file: str) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(self.directory / file, os.O_RDONLY)
        return self._fds[file]

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """The rows at ``index``, read into one fresh tensor (torch's allocator: huge pages
        with ``THP_MEM_ALLOC_ENABLE``, no zero fill; a ``bytearray`` of a 224-px layer's
        batch cost 4x the read itself); codes decoded."""
        size = self.stored_row_nbytes
        rows = torch.empty((len(index), *self.row_shape), dtype=self.dtype)
        if rows.numel():
            view = memoryview(rows.view(torch.uint8).numpy()).cast("B")
            for k, (shard, offset) in enumerate(self._locations(index)):
                if _read_into(self._fd(shard.file), view[k * size:(k + 1) * size],
                              offset) != size:
                    raise CorruptCacheError(f"shard {self.directory / shard.file} is truncated")
        if self.grid is not None:
            rows = decode(rows, *self.grid)
        return rows.to(self.device)

    def advise(self, index: torch.Tensor) -> None:
        """Ask the kernel to read the rows at ``index`` ahead (``POSIX_FADV_WILLNEED``):
        rows not in the page cache are read from disk while the caller computes, by the
        kernel, without a thread here competing with the caller's for the cores."""
        if self.stored_row_nbytes and hasattr(os, "posix_fadvise"):
            for shard, offset in self._locations(index):
                os.posix_fadvise(self._fd(shard.file), offset, self.stored_row_nbytes,
                                 os.POSIX_FADV_WILLNEED)

    def _locations(self, index: torch.Tensor) -> list[tuple[ShardInfo, int]]:
        """The shard and byte offset in it of each row at ``index``."""
        index = index.cpu()
        shard_of = torch.searchsorted(self._starts, index, right=True) - 1
        offsets = (index - self._starts[shard_of]) * self.stored_row_nbytes
        return [(self.shards[shard], offset) for shard, offset
                in zip(shard_of.tolist(), offsets.tolist(), strict=True)]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()


def _read_into(fd: int, target: memoryview, offset: int) -> int:
    """Read ``len(target)`` bytes at ``offset`` straight into ``target``; returns the count."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [target], offset)
    chunk = os.pread(fd, len(target), offset)
    target[:len(chunk)] = chunk
    return len(chunk)


def write_layer_cache(directory: Path,
                      pairs: Iterable[tuple[torch.Tensor | ActivationCodes, torch.Tensor]],
                      ) -> int:
    """Stream ``(inputs, targets)`` pairs into shards plus a manifest under ``directory``
    (which must exist and be empty); returns the number of rows written. Inputs may come
    as :class:`~.activation_codes.ActivationCodes`, read back decoded. The shards are
    written behind the pairs' producer (:mod:`~.background_writes`): nothing may change a
    pair's tensors after it is yielded."""
    directory = Path(directory)
    writes = BackgroundWrites()
    try:
        for i, (x, y) in enumerate(pairs):
            writes.submit(_write_pair, directory, i, x, y)
        shards = writes.results()
    except BaseException:
        writes.cancel()
        raise
    inputs = [x for x, _ in shards]
    write_manifest(directory, {"inputs": inputs, "targets": [y for _, y in shards]})
    return sum(s.rows for s in inputs)


def _write_pair(directory: Path, index: int, x: torch.Tensor | ActivationCodes,
                y: torch.Tensor) -> tuple[ShardInfo, ShardInfo]:
    return (write_shard(directory, f"inputs_{index:05d}.bin", x),
            write_shard(directory, f"targets_{index:05d}.bin", y))


def cached_groups(directory: Path, device: torch.device | str = "cpu",
                  ) -> list[tuple[ShardStore, ShardStore]]:
    """``(inputs, targets)`` stores of a layer cache, one pair per input row shape,
    in order of first appearance (the grouping of the in-memory path). Inputs of one
    shape written both as codes and as floats (a batch with NaN values has no codes) are
    two groups."""
    manifest = read_manifest(Path(directory), verify=False)
    by_shape: dict[tuple, list[int]] = {}
    for i, shard in enumerate(manifest["inputs"]):
        by_shape.setdefault((shard.row_shape, shard.dtype, shard.grid), []).append(i)
    return [(ShardStore(directory, [manifest["inputs"][i] for i in idx], device),
             ShardStore(directory, [manifest["targets"][i] for i in idx], device))
            for idx in by_shape.values()]
