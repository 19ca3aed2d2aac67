"""Import ``torchvision.models`` beside a torch build that torchvision's compiled ops don't fit.

PyPI's torchvision 0.28.0 wheel is built against a CUDA torch: beside the CPU torch 2.13.0 its
``_C`` library fails to load and ``import torchvision`` raises while registering those ops
(``operator torchvision::nms does not exist``). The model classes need none of them. When the
library does not load, ``torchvision`` is registered as a bare package (its ``__init__`` not
run), so ``torchvision.models`` imports from the installed files; the ops stay unavailable in
this process (``torchvision.ops.nms`` raises ``Couldn't load custom C++ ops``).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import torch

INSTALL_HINT = "install the examples extra: pip install -e '.[examples]'"


def torchvision_models() -> types.ModuleType:
    """``torchvision.models``, whether or not torchvision's compiled ops load."""
    if "torchvision" not in sys.modules:
        spec = importlib.util.find_spec("torchvision")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(f"package 'torchvision' is not installed; {INSTALL_HINT}")
        package_dir = Path(next(iter(spec.submodule_search_locations)))
        if not compiled_ops_load(package_dir):
            _register_bare_package(package_dir)
    return importlib.import_module("torchvision.models")


def compiled_ops_load(package_dir: Path) -> bool:
    """Whether torchvision's ``_C`` library loads into this torch."""
    library = next(iter(sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd"))),
                   None)
    if library is None:
        return False
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError):
        return False
    return True


def _register_bare_package(package_dir: Path) -> None:
    spec = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    spec.submodule_search_locations = [str(package_dir)]
    package = importlib.util.module_from_spec(spec)
    package.__file__ = str(package_dir / "__init__.py")
    sys.modules["torchvision"] = package
