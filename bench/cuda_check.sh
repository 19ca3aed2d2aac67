#!/usr/bin/env bash
# The engine's CUDA checks on a GPU machine: the device tests (tests/core/test_cuda.py, the
# device-parametrised architecture and speed-invariant tests), then bench/bench_cuda.py. Needs a Python with a CUDA
# torch; pydantic and its needs can come as wheels in .whl/ (python3 -m pip download ...).
# Writes pytest.log, bench.log and cuda.json to $OUT (default: bench/results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
python3 -m pytest -q -p no:cacheprovider tests/core/test_cuda.py tests/core/test_architectures.py \
    tests/core/test_speed_invariants.py 2>&1 | tee "$OUT/pytest.log"
tests=${PIPESTATUS[0]}
python3 -m bench.bench_cuda --bits 2 --out "$OUT/cuda.json" 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}
echo "pytest exit $tests, bench exit $bench"
exit $(( tests || bench ))
