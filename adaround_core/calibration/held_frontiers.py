"""Paused forward passes handed to the next layer's capture in memory instead of on disk.

A pipeline runs its layers' capture tasks one after another in one process, and each
leaves the passes paused at its layer's boundary for the next (a layer boundary's
frontiers, :mod:`~adaround_core.calibration.frontier_store`). Writing those bytes and
reading them back is most of a large model's capture after the convolutions themselves.
So a writer may hold frontiers in this process's memory, up to a byte budget shared by
everything held, and write only the rest; the boundary's manifest names each held one by
a token. The next capture takes (removes) them from here. Another process, or this one
after they were dropped, finds them missing: the boundary is then unusable and that
capture starts from the model input (one partial pass, the same bytes), as after a crash.
"""

from __future__ import annotations

import threading
import uuid

from adaround_core.calibration.segmented_forward import Frontier


class HeldFrontiers:
    """Frontiers by ``(token, batch index)``, at most ``budget`` bytes in all."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, int], tuple[Frontier, int]] = {}
        self._nbytes = 0  # the sizes of everything in _held
        self._moved = 0  # the sizes of everything offered, taken or dropped so far
        self._lock = threading.Lock()

    @staticmethod
    def new_token() -> str:
        """A token no other boundary of this process (or any other) uses."""
        return uuid.uuid4().hex

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        with self._lock:
            return self._nbytes

    @property
    def moved(self) -> int:
        """Bytes of the frontiers offered (held or not: those are written, then freed),
        taken or dropped since this process started: frontier memory allocated or freed
        (a caller returning freed memory to the system watches it grow)."""
        with self._lock:
            return self._moved

    def offer(self, token: str, index: int, frontier: Frontier, budget: int,
              size: int | None = None) -> bool:
        """Hold ``frontier`` (of ``size`` bytes, measured when not given) when it fits in
        ``budget`` beside what is held; whether it was taken (False: write it to disk)."""
        size = frontier.nbytes() if size is None else size
        with self._lock:
            if (token, index) in self._held:
                return False
            self._moved += size
            if self._nbytes + size > budget:
                return False
            self._held[(token, index)] = (frontier, size)
            self._nbytes += size
            return True

    def holds(self, token: str, index: int) -> bool:
        with self._lock:
            return (token, index) in self._held

    def take(self, token: str, index: int) -> Frontier | None:
        """The held frontier, removed (None when this process does not hold it)."""
        with self._lock:
            entry = self._held.pop((token, index), None)
            if entry is None:
                return None
            self._nbytes -= entry[1]
            self._moved += entry[1]
        return entry[0]

    def drop(self, tokens: set[str]) -> None:
        """Forget every frontier held under ``tokens`` (their boundary is deleted)."""
        with self._lock:
            for key in [key for key in self._held if key[0] in tokens]:
                size = self._held.pop(key)[1]
                self._nbytes -= size
                self._moved += size


HELD_FRONTIERS = HeldFrontiers()  # this process's
