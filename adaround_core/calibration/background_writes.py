"""A capture's file writes, run on one background thread behind the forward passes.

Writing a 224-px layer's cache and frontiers moves tens of GB through the page cache; the
kernel makes the writer wait whenever the disk falls behind. On the forward pass's
thread those waits add to the capture; on a writer thread they overlap the next batch's
convolutions. At most ``depth`` writes of a writer are pending at a time (the caller
waits for the oldest beyond that), so the tensors waiting to be written stay bounded.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capture-writer")
DEPTH = 2


class BackgroundWrites:
    """Write jobs of one writer, run in order on the shared writer thread; their results
    in submission order from :meth:`results`. An error of a job is raised in the caller's
    thread, by the next :meth:`submit` or by :meth:`results`."""

    def __init__(self, depth: int = DEPTH) -> None:
        self.depth = depth
        self._pending: deque[Future] = deque()
        self._results: list[Any] = []

    def submit(self, job: Callable[..., Any], *args: Any) -> None:
        while len(self._pending) >= self.depth:
            self._results.append(self._pending.popleft().result())
        self._pending.append(_THREAD.submit(job, *args))

    def results(self) -> list[Any]:
        """Every job's result, in order, once all have run."""
        while self._pending:
            self._results.append(self._pending.popleft().result())
        return self._results

    def cancel(self) -> None:
        """Drop the jobs not started, wait for the one running (its error ignored), so
        nothing is written after the caller gives up the directory."""
        for future in self._pending:
            future.cancel()
        for future in self._pending:
            if not future.cancelled():
                future.exception()
        self._pending.clear()
