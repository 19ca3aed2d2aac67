"""The layer contracts of ``pyproject.toml`` hold, and ``lint-imports`` fails when an import
breaks one (checked on a copy of the packages with one bad import added)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")
PACKAGES = ("adaround_core", "tasks", "flows", "examples")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=root, capture_output=True,
                          text=True, timeout=120)


def test_the_repository_keeps_every_contract():
    done = _lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(("module", "bad_import", "broken"), [
    ("adaround_core/reconstruction/report.py", "import prefect", "imports no orchestration"),
    ("adaround_core/quant/quant_math.py", "import mlflow", "imports no orchestration"),
    ("tasks/io.py", "import flows.runtime", "Pipeline layers"),
    ("adaround_core/calibration/batches.py", "import adaround_core.reconstruction.threads",
     "Engine subpackages"),
    ("adaround_core/export/encodings.py", "import adaround_core.reconstruction.report",
     "Engine subpackages"),
    ("flows/sweep.py", "from flows import __main__", "No import cycles"),
    ("tasks/params.py", "import tasks.tracking", "No import cycles"),
    ("examples/chain.py", "import tasks.io", "The examples use the engine, not the pipeline"),
    ("adaround_core/quant/prepare.py", "import examples.chain", "The engine does not import"),
])
def test_a_bad_import_breaks_a_contract(tmp_path, module, bad_import, broken):
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with open(tmp_path / module, "a") as f:
        f.write(f"\n{bad_import}  # noqa\n")
    done = _lint_imports(tmp_path)
    assert done.returncode != 0
    assert broken in done.stdout.partition("Broken contracts")[2]
