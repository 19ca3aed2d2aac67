"""Process-wide defaults of a pipeline command, set explicitly (never at import time).

Telemetry cannot reach the internet here (MLflow's delays the exit of every process that
imported mlflow by ~2 s), and a fresh ``PREFECT_HOME`` takes up to ~20 s to start the
temporary Prefect server. Values the user set in the environment always win.
"""

from __future__ import annotations

import os

PROCESS_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}


def apply_process_defaults() -> None:
    """Set every :data:`PROCESS_DEFAULTS` entry the environment does not already set."""
    for key, value in PROCESS_DEFAULTS.items():
        os.environ.setdefault(key, value)
