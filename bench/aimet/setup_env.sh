#!/usr/bin/env bash
# Build bench/aimet/.venv: the separate environment of the AdaRound-vs-AIMET benchmark.
#
# AIMET (aimet-torch 2.42.0) is never a dependency of this project. It imports torchvision,
# and PyPI's torchvision does not import beside the project's CPU torch 2.13.0
# ("operator torchvision::nms does not exist"), so this environment takes the matching pair
# torch 2.14.1 + torchvision 0.29.1 (a CUDA build, ~5.5 GB, that runs on CPU). Our engine is
# used from the source tree through PYTHONPATH (bench/aimet/run.sh); it is NOT pip-installed
# here, because the project pins torch==2.13.0.
#
# Usage (from the repository root):  bash bench/aimet/setup_env.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.14.1"
TORCHVISION_PIN="torchvision==0.29.1"
AIMET_PIN="aimet-torch==2.42.0"

if [[ -f "$VENV/.installed" ]]; then
    echo "bench/aimet/.venv is ready (delete it to rebuild)"
    exit 0
fi
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "$TORCH_PIN" "$TORCHVISION_PIN"
# The same torch pair again, so AIMET's resolver cannot move it.
"${PIP[@]}" "$AIMET_PIN" "$TORCH_PIN" "$TORCHVISION_PIN"
# The light dependencies of adaround_core (see pyproject.toml), plus psutil for peak RSS.
"${PIP[@]}" pydantic tqdm scikit-learn safetensors pyyaml matplotlib psutil
"$VENV/bin/python" - <<'PY'
import aimet_torch, torch, torchvision
from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters  # noqa: F401
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"aimet-torch {getattr(aimet_torch, '__version__', '?')}")
PY
touch "$VENV/.installed"
echo "ready: bench/aimet/.venv"
