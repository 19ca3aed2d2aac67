"""The test tree's own rule: ``make test`` collects tests/core, tests/pipeline and
tests/examples in one pytest run, where two test files of the same basename collide."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_test_file_basenames_are_unique_across_the_test_tree():
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
