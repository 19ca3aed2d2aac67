"""``ProcessMemo``: what the stage's tasks keep across layers (prepared models, graphs)."""

from __future__ import annotations

import threading
import time

from tasks.process_memo import ProcessMemo


def test_each_key_is_made_once_and_the_least_recently_used_goes_first():
    memo: ProcessMemo[str] = ProcessMemo(kept=2)
    made: list[str] = []

    def maker(key: str):
        return lambda: made.append(key) or key.upper()

    assert memo.get("a", maker("a")) == "A"
    assert memo.get("b", maker("b")) == "B"
    assert memo.get("a", maker("a")) == "A"  # kept: not made again, now the most recent
    assert memo.get("c", maker("c")) == "C"  # evicts "b", the least recently used
    assert memo.get("a", maker("a")) == "A"
    assert memo.get("b", maker("b")) == "B"  # made again
    assert made == ["a", "b", "c", "b"]
    memo.clear()
    memo.get("a", maker("a"))
    assert made[-1] == "a"


def test_threads_asking_for_one_key_make_it_once():
    memo: ProcessMemo[object] = ProcessMemo(kept=1)
    made: list[int] = []

    def slow_make():
        made.append(1)
        time.sleep(0.05)  # the other threads arrive while this one makes the value
        return object()

    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(memo.get("k", slow_make)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 1 and len({id(r) for r in results}) == 1
