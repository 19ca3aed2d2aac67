"""What keys a layer's result: the engine's code without the demo, and the model's source."""

from __future__ import annotations

import sys

from tasks.versioning import NOT_ENGINE, code_version, source_digest, tree_digest


def _tree(root):
    (root / "demo").mkdir(parents=True)
    (root / "engine.py").write_text("A = 1\n")
    (root / "demo" / "data.py").write_text("B = 1\n")
    return root


def test_the_engine_digest_ignores_the_demo_and_sees_the_engine(tmp_path):
    root = _tree(tmp_path / "pkg")
    before = tree_digest(root, NOT_ENGINE)
    (root / "demo" / "data.py").write_text("B = 2\n")
    assert tree_digest(root, NOT_ENGINE) == before
    (root / "engine.py").write_text("A = 2\n")
    assert tree_digest(root, NOT_ENGINE) != before
    assert "demo" in NOT_ENGINE and len(code_version()) == 64


def test_the_model_source_digest_follows_the_module_file(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "user_model_v.py").write_text("def build():\n    return 1\n")
    before = source_digest("user_model_v:build")
    source_digest.cache_clear()
    (tmp_path / "user_model_v.py").write_text("def build():\n    return 2\n")
    sys.modules.pop("user_model_v", None)
    assert source_digest("user_model_v:build") != before
    assert source_digest("adaround_core.demo.models:DigitsCNN") != \
        source_digest("adaround_core.demo.digits:digits_dataset")
