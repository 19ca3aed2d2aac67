"""A small least-recently-used memo of values that live as long as the process.

The stage's layer tasks run one after another in one process and rebuild the same things
(the prepared model, its traced graph); a memo keyed by the inputs' digests keeps the last
few so later tasks skip the work. Thread-safe: Prefect may run tasks in worker threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

Value = TypeVar("Value")


class ProcessMemo(Generic[Value]):
    """The values of the ``kept`` most recently used keys, each made once by ``make``."""

    def __init__(self, kept: int) -> None:
        self.kept = kept
        self._values: OrderedDict[Hashable, Value] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], Value]) -> Value:
        """The value of ``key``, made (under the lock, so once) if it is not kept."""
        with self._lock:
            if key not in self._values:
                self._values[key] = make()
                while len(self._values) > self.kept:
                    self._values.popitem(last=False)
            self._values.move_to_end(key)
            return self._values[key]

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
