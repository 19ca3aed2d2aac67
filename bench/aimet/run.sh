#!/usr/bin/env bash
# AdaRound vs AIMET side by side. Builds bench/aimet/.venv on first use, then runs
# bench/aimet/side_by_side.py there with this repository's source on PYTHONPATH.
# Arguments are passed through (see --help), e.g.:  bash bench/aimet/run.sh --steps 1000
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bash "$ROOT/bench/aimet/setup_env.sh" >&2
cd "$ROOT"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$ROOT/bench/aimet/.venv/bin/python" \
    -m bench.aimet.side_by_side "$@"
