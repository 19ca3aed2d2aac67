"""Process-wide defaults of a pipeline command, set explicitly (never at import time).

Large tensors get huge pages and their own mappings (:data:`PROCESS_DEFAULTS`,
:func:`tasks.allocator.map_large_allocations`): at 224 px both halved the time and the peak
memory of capture.

Telemetry cannot reach the internet here (MLflow's delays the exit of every process that
imported mlflow by ~2 s), and a fresh ``PREFECT_HOME`` takes up to ~20 s to start the
temporary Prefect server. Prefect pickles the exception of every failed flow run into its
local result storage whatever ``persist_result`` says: that storage is a temporary folder of
the command, removed when it exits. Values the user set in the environment always win.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from tasks.allocator import map_large_allocations

PROCESS_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    # OpenMP threads that sleep instead of spinning while they wait: with spinning, two
    # threads ran AdaRound steps slower than one on a loaded 2-core machine (BENCHMARKS.md,
    # "Thread choice per layer"); read once, when torch loads, so it is set before that
    "OMP_WAIT_POLICY": "PASSIVE",
    # torch backs CPU tensors of 2 MB and more with transparent huge pages: a fresh 100 MB
    # activation is then 50 page faults instead of 25 000 (an element-wise op on a 224-px
    # batch ran 3-4x faster; BENCHMARKS.md, "The adaround stage at scale"); read once, at
    # torch's first allocation
    "THP_MEM_ALLOC_ENABLE": "1",
}
RESULT_STORAGE_KEYS = ("PREFECT_RESULTS_LOCAL_STORAGE_PATH", "PREFECT_LOCAL_STORAGE_PATH")


def apply_process_defaults() -> None:
    """Set every :data:`PROCESS_DEFAULTS` entry the environment does not already set, and
    give Prefect a result storage folder that lives as long as this process."""
    for key, value in PROCESS_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not any(os.environ.get(key) for key in RESULT_STORAGE_KEYS):
        storage = tempfile.mkdtemp(prefix="adaround-prefect-results-")
        os.environ[RESULT_STORAGE_KEYS[0]] = storage
        atexit.register(shutil.rmtree, storage, ignore_errors=True)
    map_large_allocations()
